"""Streaming centred statistics of paired activations (the state of activation
matching), shaped like a torchmetrics ``Metric``: :meth:`ActivationStats.update`
per batch, :meth:`~ActivationStats.merge` of two partial states,
:meth:`~ActivationStats.sync` across ``torch.distributed`` ranks,
:meth:`~ActivationStats.compute` at the end and
:meth:`~ActivationStats.reset` to start over."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ArgumentTypeError, ArgumentValueError, DataError, _check_choice, _check_int, _describe

__all__ = ["COSTS", "ActivationStats"]

COSTS = ("correlation", "covariance", "euclidean")
"""Choices of :meth:`ActivationStats.compute` (and of ``match_activations(..., cost=...)``)."""


class ActivationStats:
    """Streaming centred statistics of paired activations ``a, b`` with ``n`` units.

    Shaped like a torchmetrics ``Metric``:

    * :meth:`update` adds one batch, ``a`` and ``b`` of shape ``(samples, n)``
      or ``(P, n, Q)``;
    * :meth:`merge` adds the statistics of another instance (another shard of
      the data), as if its batches had been passed to :meth:`update`;
    * :meth:`sync` merges the statistics of every ``torch.distributed`` rank
      (a no-op without an initialised process group);
    * :meth:`compute` returns the ``(n, n)`` similarity;
    * :meth:`reset` returns to the empty state.

    State, all float64 on ``device``: ``count`` (samples seen, an int),
    ``mean_a`` and ``mean_b`` ``(n,)``, ``m2_a`` and ``m2_b`` ``(n,)`` (sums
    of squared deviations from the mean), ``cross`` ``(n, n)`` (sum of the
    products of A's and B's deviations: ``cross[i, j] = sum_s (a_si - mean_a_i)
    (b_sj - mean_b_j)``). Partial states are combined with the parallel update
    of Chan et al. (1979), so no sum of raw squares is ever formed and large
    activation offsets do not cancel precision away. Memory is O(n^2), never
    the activations themselves.

    Args:
        n: the number of units (an int >= 1).
        device: where the state lives (that of the activations).

    Raises:
        ArgumentTypeError: ``n`` is not an int.
        ArgumentValueError: ``n < 1``.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        _check_int(n, "n", 1)
        self.n = int(n)
        self.count = 0
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.mean_a = torch.zeros(self.n, **kw)
        self.mean_b = torch.zeros(self.n, **kw)
        self.m2_a = torch.zeros(self.n, **kw)
        self.m2_b = torch.zeros(self.n, **kw)
        self.cross = torch.zeros(self.n, self.n, **kw)

    def __repr__(self) -> str:
        return f"ActivationStats(n={self.n}, count={self.count}, device={self.mean_a.device})"

    def update(self, a: Tensor, b: Tensor) -> None:
        """Add samples of A's and B's activations.

        Args:
            a: A's activations, ``(samples, n)``, or ``(P, n, Q)`` with units
                on dim 1 and samples on dims 0 and 2 (an NCHW activation
                viewed as ``(N, C, H * W)`` without a copy: ``P * Q``
                samples).
            b: B's activations, of the same shape.

        The batch's means, variances and centred cross products are computed
        in the activations' own precision (float32 for a float32 model,
        float64 for a float64 one; float32 for other dtypes) and merged into
        the float64 statistics.

        Raises:
            ArgumentTypeError: ``a`` or ``b`` is not a tensor.
            ArgumentValueError: ``a`` is not 2-D or 3-D with ``n`` units on
                dim 1, or ``b``'s shape differs from ``a``'s.
        """
        self._check_batch(a, b)
        if a.dim() == 3 and a.shape[2] == 1:
            a, b = a[:, :, 0], b[:, :, 0]
        elif a.dim() == 3 and a.shape[0] == 1:
            a, b = a[0].T, b[0].T
        work = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
        a, b = a.to(work), b.to(work)
        dims = (0,) if a.dim() == 2 else (0, 2)
        m = a.numel() // a.shape[1]
        mean_a, mean_b = a.mean(dims), b.mean(dims)  # (torch.var_mean is ~10x slower on CPU here)
        if a.dim() == 3 and a.shape[1] <= a.shape[2]:  # units <= positions: batched products are cheap
            centred_a, centred_b = a - mean_a[:, None], b - mean_b[:, None]
            cross = torch.bmm(centred_a, centred_b.transpose(1, 2)).sum(0)
        elif a.dim() == 3:  # many units, few positions: centre straight into a (n, P * Q) layout
            centred_a, centred_b = _centred_rows(a, mean_a), _centred_rows(b, mean_b)
            cross, dims = centred_a @ centred_b.T, (1,)
        else:
            centred_a, centred_b = a - mean_a, b - mean_b
            cross = centred_a.T @ centred_b
        m2_a = centred_a.square_().sum(dims).double()  # in place: the centred copies are done with
        m2_b = centred_b.square_().sum(dims).double()
        self._merge(m, mean_a.double(), mean_b.double(), m2_a, m2_b, cross.double())

    def _check_batch(self, a: Any, b: Any) -> None:
        for value, argument in ((a, "a"), (b, "b")):
            if not isinstance(value, Tensor):
                raise ArgumentTypeError(
                    f"Argument {argument!r} of ActivationStats.update is {_describe(value)}; pass a tensor of "
                    f"shape (samples, {self.n}) or (P, {self.n}, Q)."
                )
        if a.dim() not in (2, 3) or a.shape[1] != self.n:
            raise ArgumentValueError(
                f"Argument 'a' of ActivationStats.update has shape {tuple(a.shape)}; pass (samples, {self.n}) or "
                f"(P, {self.n}, Q): these statistics are of {self.n} units."
            )
        if b.shape != a.shape:
            raise ArgumentValueError(
                f"Argument 'b' of ActivationStats.update has shape {tuple(b.shape)} but 'a' has "
                f"{tuple(a.shape)}; pass paired activations of one shape."
            )

    def _merge(self, m: int, mean_a: Tensor, mean_b: Tensor, m2_a: Tensor, m2_b: Tensor, cross: Tensor) -> None:
        """Add a partial state of ``m`` samples (Chan et al.'s parallel update)."""
        total = self.count + m
        if total == 0:
            return
        da, db = mean_a - self.mean_a, mean_b - self.mean_b
        weight = self.count * m / total
        self.m2_a += m2_a + weight * da**2
        self.m2_b += m2_b + weight * db**2
        self.cross += cross + weight * torch.outer(da, db)
        self.mean_a += da * (m / total)
        self.mean_b += db * (m / total)
        self.count = total

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Add ``other``'s statistics to these (in place), as if its batches had
        been passed to :meth:`update`; ``other`` is left unchanged.

        Args:
            other: statistics of the same ``n`` units (of another shard of
                the data); moved to this instance's device.

        Returns:
            ``self``, so merges chain.

        Raises:
            ArgumentTypeError: ``other`` is not an :class:`ActivationStats`.
            ArgumentValueError: ``other`` has another number of units.
        """
        if not isinstance(other, ActivationStats):
            raise ArgumentTypeError(
                f"Argument 'other' of ActivationStats.merge is {_describe(other)}; pass an ActivationStats."
            )
        if other.n != self.n:
            raise ArgumentValueError(
                f"Argument 'other' of ActivationStats.merge has {other.n} units but these statistics have "
                f"{self.n}; merge statistics of the same units."
            )
        device = self.mean_a.device
        self._merge(
            other.count,
            other.mean_a.to(device),
            other.mean_b.to(device),
            other.m2_a.to(device),
            other.m2_b.to(device),
            other.cross.to(device),
        )
        return self

    def reset(self) -> None:
        """Return to the empty state (no samples), keeping ``n`` and the device."""
        self.count = 0
        for tensor in (self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.cross):
            tensor.zero_()

    def sync(self) -> None:
        """Merge the statistics of all ``torch.distributed`` ranks, in place on
        every rank (a no-op without an initialised process group).

        Every rank re-centres its deviations on the global mean, then the
        count, sums and deviation sums are all-reduced (six collectives). A
        rank without samples takes part with zero counts. Every rank must
        call it on its instances in the same order; call it once: after it
        each rank holds the global statistics, and a second call would count
        every sample once per rank again.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.mean_a.device)
        sum_a, sum_b = self.mean_a * self.count, self.mean_b * self.count
        for tensor in (count, sum_a, sum_b):
            dist.all_reduce(tensor)
        total = max(float(count), 1.0)
        mean_a, mean_b = sum_a / total, sum_b / total
        da, db = self.mean_a - mean_a, self.mean_b - mean_b
        self.m2_a += self.count * da**2
        self.m2_b += self.count * db**2
        self.cross += self.count * torch.outer(da, db)
        for tensor in (self.m2_a, self.m2_b, self.cross):
            dist.all_reduce(tensor)
        self.mean_a, self.mean_b, self.count = mean_a, mean_b, int(count)

    def is_finite(self) -> bool:
        """Whether the cross-deviations and A's deviation sums are all finite."""
        return bool(torch.isfinite(self.cross).all() and torch.isfinite(self.m2_a).all())

    def compute(self, cost: str = "correlation") -> Tensor:
        """``(n, n)`` float64 similarity of A's unit i (rows) and B's unit j (columns).

        ``correlation``: Pearson correlation; a unit with zero variance (dead or
        constant) has correlation 0 with everything. ``covariance``: cross-
        covariance (normalised by the count, not count - 1). ``euclidean``:
        minus the mean squared distance ``E(a_i - b_j)^2``.

        Raises:
            ArgumentValueError: an unknown ``cost``.
            DataError: no samples were accumulated.
        """
        _check_choice(cost, "cost", COSTS)
        if self.count == 0:
            raise DataError("ActivationStats has no samples; call update(a, b) with at least one batch first.")
        cov = self.cross / self.count
        if cost == "covariance":
            return cov
        var_a, var_b = self.m2_a / self.count, self.m2_b / self.count
        if cost == "euclidean":  # E(a_i - b_j)^2 = var_i + var_j - 2 cov_ij + (mean_i - mean_j)^2
            gap = self.mean_a[:, None] - self.mean_b[None, :]
            return -(var_a[:, None] + var_b[None, :] - 2 * cov + gap**2)
        denom = torch.outer(var_a.clamp_min(0).sqrt(), var_b.clamp_min(0).sqrt())
        tiny = torch.finfo(torch.float64).eps * max(float(denom.max()), 1.0)
        corr = torch.where(denom > tiny, cov / denom.clamp_min(tiny), torch.zeros_like(cov))
        return corr.clamp_(-1.0, 1.0)

    def similarity(self, cost: str = "correlation") -> Tensor:
        """The same as :meth:`compute` (its earlier name)."""
        return self.compute(cost)


def _centred_rows(x: Tensor, mean: Tensor) -> Tensor:
    """``(P, n, Q)`` activations minus their unit means, as ``(n, P * Q)`` rows,
    written in one pass."""
    out = torch.empty((x.shape[1], x.shape[0], x.shape[2]), dtype=x.dtype, device=x.device)
    torch.sub(x.transpose(0, 1), mean[:, None, None], out=out)
    return out.view(x.shape[1], -1)
