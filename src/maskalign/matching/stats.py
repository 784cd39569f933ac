"""Streaming centred statistics of paired activations (the state of activation
matching), shaped like a torchmetrics ``Metric``: :meth:`ActivationStats.update`
per batch, :meth:`~ActivationStats.merge` of two partial states,
:meth:`~ActivationStats.sync` across ``torch.distributed`` ranks,
:meth:`~ActivationStats.compute` at the end and
:meth:`~ActivationStats.reset` to start over."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ArgumentTypeError, ArgumentValueError, DataError, _check_choice, _check_int, _describe

__all__ = ["COSTS", "STATS_DTYPES", "ActivationStats", "TieBreakStats", "TieBreakSimilarity"]

COSTS = ("correlation", "covariance", "euclidean")
"""Choices of :meth:`ActivationStats.compute` (and of ``match_activations(..., cost=...)``)."""

STATS_DTYPES = (torch.float32, torch.float64)
"""Dtypes a batch's statistics can be computed in (``stats_dtype``); the
merged state is float64 whatever the choice."""

_SQUARE_ROLES = ("cross", "outer")
"""Scratch buffers of ``(n, n)`` entries (:meth:`ActivationStats.workspace_bytes`
counts them); the other roles are of the size of one activation."""


class _Workspace:
    """Scratch buffers reused by every update of a set of statistics (one per
    role, grown to the largest request), so that an update of wide statistics
    writes into memory that is already mapped instead of allocating (and
    page-faulting) fresh ``(n, n)`` matrices per batch. Results are those of
    fresh tensors: the same kernels write into them."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        numel = math.prod(shape)
        key = (role, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # free the smaller one first
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def nbytes(self, square_only: bool = False) -> int:
        """Bytes held (``square_only``: of the ``(n, n)`` roles only)."""
        return sum(
            b.numel() * b.element_size()
            for (role, _, _), b in self._buffers.items()
            if not square_only or role in _SQUARE_ROLES
        )

    def clear(self) -> None:
        self._buffers.clear()


class _Batch(NamedTuple):
    """One batch prepared for its cross products (:meth:`ActivationStats._prepare`):
    ``m`` samples, the means and centred copies in ``stats_dtype``, the dims
    that index samples in them and their ``layout``: ``"batched"`` (``(P, n,
    Q)``), ``"rows"`` (``(n, m)``) or ``"columns"`` (``(m, n)``)."""

    m: int
    mean_a: Tensor
    mean_b: Tensor
    centred_a: Tensor
    centred_b: Tensor
    dims: tuple[int, ...]
    layout: str


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

    State, all float64 on ``device`` whatever ``stats_dtype``: ``count`` (samples seen, an int),
    ``mean_a`` and ``mean_b`` ``(n,)``, ``m2_a`` and ``m2_b`` ``(n,)`` (sums
    of squared deviations from the mean), ``cross`` ``(n, n)`` (sum of the
    products of A's and B's deviations: ``cross[i, j] = sum_s (a_si - mean_a_i)
    (b_sj - mean_b_j)``). Partial states are combined with the parallel update
    of Chan et al. (1979), so no sum of raw squares is ever formed and large
    activation offsets do not cancel precision away. Memory is O(n^2), never
    the activations themselves: :attr:`nbytes` of state
    (:meth:`state_bytes`), plus, while updating and computing, scratch of at
    most :meth:`workspace_bytes`.

    Args:
        n: the number of units (an int >= 1).
        device: where the state lives (that of the activations).
        stats_dtype: the dtype each batch's means, deviations and cross
            products are computed in before the float64 merge:
            ``torch.float32`` or ``torch.float64``; ``None`` (default): the
            activations' own precision (float32 for a float32 model, float64
            for a float64 one, float32 for other dtypes).

    Raises:
        ArgumentTypeError: ``n`` is not an int, or ``stats_dtype`` is not a
            ``torch.dtype``.
        ArgumentValueError: ``n < 1``, or ``stats_dtype`` is another dtype.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu", stats_dtype: torch.dtype | None = None) -> None:
        _check_int(n, "n", 1)
        _check_stats_dtype(stats_dtype)
        self.n = int(n)
        self.count = 0
        self.stats_dtype = stats_dtype
        self._workspace: _Workspace | None = None  # shared scratch (set by match_activations)
        self._observer: Callable[[Tensor, Tensor, tuple[int, ...]], None] | None = None  # sees each batch
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.mean_a = torch.zeros(self.n, **kw)
        self.mean_b = torch.zeros(self.n, **kw)
        self.m2_a = torch.zeros(self.n, **kw)
        self.m2_b = torch.zeros(self.n, **kw)
        self.cross = torch.zeros(self.n, self.n, **kw)

    def __repr__(self) -> str:
        return f"ActivationStats(n={self.n}, count={self.count}, device={self.mean_a.device})"

    @staticmethod
    def state_bytes(n: int) -> int:
        """Bytes of the state of ``n`` units: ``(n, n)`` cross deviations and
        four ``(n,)`` vectors, all float64 (what :attr:`nbytes` counts)."""
        return 8 * (n * n + 4 * n)

    @staticmethod
    def workspace_bytes(n: int) -> int:
        """Bound on the scratch of ``n`` units beyond the state: three float64
        ``(n, n)`` matrices. An update holds the batch's cross products (in
        ``stats_dtype``) and the merge term (a float32 batch is widened as
        it is added, without a float64 copy); computing the similarity
        holds it, the denominator and a mask (17 bytes per entry); the
        assignment solver copies the similarity once or twice. Scratch of
        the size of one activation (centred copies) comes on top."""
        return 24 * n * n

    @property
    def nbytes(self) -> int:
        """Bytes of the state tensors (``numel * element_size``) as allocated."""
        return sum(t.numel() * t.element_size() for t in (self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.cross))

    def _scratch(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        if self._workspace is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return self._workspace.take(role, shape, dtype, device)

    def _centred(self, x: Tensor, mean: Tensor, role: str) -> Tensor:
        """``x - mean``; into scratch when ``x`` is contiguous (a strided ``x``
        keeps the layout ``x - mean`` gives it, and with it the order of the
        sums over it)."""
        if not x.is_contiguous():
            return x - mean
        return torch.sub(x, mean, out=self._scratch(role, tuple(x.shape), x.dtype, x.device))

    def _work_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.stats_dtype is not None:
            return self.stats_dtype
        return dtype if dtype in STATS_DTYPES else torch.float32

    def update(self, a: Tensor, b: Tensor) -> None:
        """Add samples of A's and B's activations.

        Args:
            a: A's activations, ``(samples, n)``, or ``(P, n, Q)`` with units
                on dim 1 and samples on dims 0 and 2 (an NCHW activation
                viewed as ``(N, C, H * W)`` without a copy: ``P * Q``
                samples).
            b: B's activations, of the same shape.

        The batch's means, variances and centred cross products are computed
        in ``stats_dtype`` (by default the activations' own precision: float32
        for a float32 model, float64 for a float64 one; float32 for other
        dtypes) and merged into the float64 statistics.

        Raises:
            ArgumentTypeError: ``a`` or ``b`` is not a tensor.
            ArgumentValueError: ``a`` is not 2-D or 3-D with ``n`` units on
                dim 1, or ``b``'s shape differs from ``a``'s.
        """
        self._check_batch(a, b)
        batch = self._prepare(a, b)
        cross = self._products(batch)
        m2_a = batch.centred_a.square_().sum(batch.dims).double()  # in place: the centred copies are done with
        m2_b = batch.centred_b.square_().sum(batch.dims).double()
        self._merge(batch.m, batch.mean_a.double(), batch.mean_b.double(), m2_a, m2_b, cross)  # widened there

    def _prepare(self, a: Tensor, b: Tensor) -> _Batch:
        """A batch's means and centred copies (in ``stats_dtype``, into the
        shared scratch), laid out for its cross products. An
        ``_observer`` (set by :class:`TieBreakStats` on the primary statistic
        it breaks ties of) sees the batch's values in ``stats_dtype``."""
        if a.dim() == 3 and a.shape[2] == 1:
            a, b = a[:, :, 0], b[:, :, 0]
        elif a.dim() == 3 and a.shape[0] == 1:
            a, b = a[0].T, b[0].T
        work = self._work_dtype(a.dtype)
        a, b = a.to(work), b.to(work)
        dims: tuple[int, ...] = (0,) if a.dim() == 2 else (0, 2)
        m = a.numel() // a.shape[1]
        n, device = self.n, a.device
        if self._observer is not None:
            self._observer(a, b, dims)
        mean_a, mean_b = a.mean(dims), b.mean(dims)  # (torch.var_mean is ~10x slower on CPU here)
        if a.dim() == 3 and a.shape[1] <= a.shape[2]:  # units <= positions: batched products are cheap
            centred_a = self._centred(a, mean_a[:, None], "centred_a")
            centred_b = self._centred(b, mean_b[:, None], "centred_b")
            return _Batch(m, mean_a, mean_b, centred_a, centred_b, dims, "batched")
        if a.dim() == 3:  # many units, few positions: centre straight into a (n, P * Q) layout
            centred_a = _centred_rows(a, mean_a, self._scratch("centred_a", (n, m), work, device))
            centred_b = _centred_rows(b, mean_b, self._scratch("centred_b", (n, m), work, device))
            return _Batch(m, mean_a, mean_b, centred_a, centred_b, (1,), "rows")
        centred_a, centred_b = self._centred(a, mean_a, "centred_a"), self._centred(b, mean_b, "centred_b")
        return _Batch(m, mean_a, mean_b, centred_a, centred_b, dims, "columns")

    def _products(self, batch: _Batch, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
        """The batch's centred cross products of A's units ``rows`` and B's
        units ``cols`` (``None``: all of them), ``(len(rows), len(cols))``,
        in ``stats_dtype``, into the shared scratch. All units give the
        full products; a subset sums in the order its (smaller) GEMM takes,
        which may round differently from the same entries of the full one."""
        ca, cb = batch.centred_a, batch.centred_b
        work, device = ca.dtype, ca.device
        if batch.layout == "batched":  # (P, n, Q)
            ca = ca if rows is None else ca[:, rows]
            cb = cb if cols is None else cb[:, cols]
            shape = (ca.shape[1], cb.shape[1])
            products = self._scratch("products", (ca.shape[0], *shape), work, device)
            torch.bmm(ca, cb.transpose(1, 2), out=products)
            return torch.sum(products, 0, out=self._scratch("cross", shape, work, device))
        if batch.layout == "rows":  # (n, m)
            ca = ca if rows is None else ca[rows]
            cb = cb if cols is None else cb[cols]
            return torch.matmul(ca, cb.T, out=self._scratch("cross", (ca.shape[0], cb.shape[0]), work, device))
        ca = ca if rows is None else ca[:, rows]  # (m, n)
        cb = cb if cols is None else cb[:, cols]
        return torch.matmul(ca.T, cb, out=self._scratch("cross", (ca.shape[1], cb.shape[1]), work, device))

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
        """Add a partial state of ``m`` samples (Chan et al.'s parallel update);
        ``cross`` may be float32 (a batch's cross products): it is widened
        exactly, entry by entry, as it is added."""
        total = self.count + m
        if total == 0:
            return
        da, db = mean_a - self.mean_a, mean_b - self.mean_b
        weight = self.count * m / total
        self.m2_a += m2_a + weight * da**2
        self.m2_b += m2_b + weight * db**2
        # self.cross += cross + weight * outer(da, db), the same roundings, in one scratch matrix; a float32
        # cross is widened (exactly) inside the add, not copied to float64 first
        term = torch.outer(da, db, out=self._scratch("outer", (self.n, self.n), torch.float64, da.device))
        self.cross += term.mul_(weight).add_(cross)
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

    def _deviations_finite(self) -> bool:
        """Whether A's and B's deviation sums are finite: O(n) where
        :meth:`is_finite` reads all ``n^2`` cross deviations. It implies them
        finite: ``|cross[i, j]| <= sqrt(m2_a[i] * m2_b[j])`` (Cauchy-Schwarz),
        and a non-finite activation or mean makes its unit's deviation sum
        non-finite."""
        return bool(torch.isfinite(self.m2_a).all() and torch.isfinite(self.m2_b).all())

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
            out = var_a[:, None] + var_b[None, :]
            out -= cov.mul_(2)
            gap = torch.sub(self.mean_a[:, None], self.mean_b[None, :], out=cov)  # reuses cov's memory
            out += gap.square_()
            return out.neg_()
        denom = torch.outer(var_a.clamp_min(0).sqrt(), var_b.clamp_min(0).sqrt())
        tiny = torch.finfo(torch.float64).eps * max(float(denom.max()), 1.0)
        degenerate = (denom > tiny).logical_not_()  # where(denom > tiny, cov / denom, 0), in place
        corr = cov.div_(denom.clamp_min_(tiny)).masked_fill_(degenerate, 0.0)
        return corr.clamp_(-1.0, 1.0)

    def similarity(self, cost: str = "correlation") -> Tensor:
        """The same as :meth:`compute` (its earlier name)."""
        return self.compute(cost)


class TieBreakSimilarity:
    """The entries of a tie-break similarity that :class:`TieBreakStats`
    collected: every column of B at A's units ``rows`` (``row_block``,
    ``(len(rows), n)``), and every row of A at B's units ``cols``
    (``col_block``, ``(n, len(cols))``), each entry equal to that of
    :meth:`ActivationStats.compute` on the full statistic of the same
    entries."""

    def __init__(self, rows: Tensor, row_block: Tensor, cols: Tensor, col_block: Tensor, n: int) -> None:
        self.rows, self.row_block, self.cols, self.col_block = rows, row_block, cols, col_block
        self.row_at = torch.full((n,), -1, dtype=torch.long)
        self.row_at[rows] = torch.arange(rows.numel())
        self.col_at = torch.full((n,), -1, dtype=torch.long)
        self.col_at[cols] = torch.arange(cols.numel())
        self.kept = 0  # units of tie classes not collected (their primary assignment is kept)

    def for_rows(self, rows: Tensor, cols: Tensor) -> Tensor | None:
        """``S[rows][:, cols]``, or ``None`` unless every unit of ``rows`` was collected."""
        at = self.row_at[rows]
        if bool((at < 0).any()):
            return None
        return self.row_block[at[:, None], cols[None, :]]

    def for_cols(self, rows: Tensor, cols: Tensor) -> Tensor | None:
        """``S[rows][:, cols]``, or ``None`` unless every unit of ``cols`` was collected."""
        at = self.col_at[cols]
        if bool((at < 0).any()):
            return None
        return self.col_block[rows[:, None], at[None, :]]


class TieBreakStats(ActivationStats):
    """The statistics of :class:`ActivationStats` whose cross deviations are
    kept only where a tie-break can read them: for A's units that are still
    *candidates* (rows, against every unit of B) and B's candidates
    (columns, against every unit of A). Means and deviation sums are kept
    for every unit, as are the state tensors' full sizes (the memory
    planner's count stays exact).

    Candidates only ever leave (:meth:`restrict`); an update adds the cross
    products of the current candidates only, so a unit that is a candidate
    at the end was one at every update, and its entries equal those of the
    full statistic (up to the rounding of the smaller GEMM per batch, see
    :meth:`ActivationStats._products`). Every other entry of ``cross`` is
    stale and never read. While every unit of either side is a candidate,
    updates are those of :class:`ActivationStats` (the same bits).
    ``entries`` counts the cross products added (per update, samples not
    counted): a negative control of the saving.

    Args:
        n, device, stats_dtype: as :class:`ActivationStats`.
        keep_rows: ``(n,)`` bool mask of A's units that stay candidates
            whatever :meth:`restrict` is given (``None``: none).
    """

    def __init__(
        self,
        n: int,
        device: torch.device | str = "cpu",
        stats_dtype: torch.dtype | None = None,
        keep_rows: Tensor | None = None,
    ) -> None:
        super().__init__(n, device, stats_dtype)
        self.constant_a = torch.ones(self.n, dtype=torch.bool)
        self.constant_b = torch.ones(self.n, dtype=torch.bool)
        self._first: list[Tensor | None] = [None, None]  # each side's first value of every unit
        self.keep_rows = torch.zeros(self.n, dtype=torch.bool) if keep_rows is None else keep_rows.cpu().bool()
        self.entries = 0

    @property
    def rows(self) -> Tensor:
        """``(n,)`` bool: A's candidate units (constant so far, or kept)."""
        return self.constant_a | self.keep_rows

    @property
    def cols(self) -> Tensor:
        """``(n,)`` bool: B's candidate units (constant so far)."""
        return self.constant_b

    @property
    def idle(self) -> bool:
        """Whether no unit is a candidate any more (nor ever will be again):
        nothing of these statistics can be read, so batches need not be added."""
        return not bool(self.rows.any() or self.cols.any())

    def restrict(self, rows: Tensor, cols: Tensor) -> None:
        """Keep as candidates only A's units in ``rows`` (or ``keep_rows``)
        and B's units in ``cols`` (``(n,)`` bool masks)."""
        self.constant_a &= rows.cpu()
        self.constant_b &= cols.cpu()

    def watch(self, primary: ActivationStats) -> None:
        """Drop candidates as they vary in ``primary`` (the statistic whose
        ties these break): every batch ``primary`` adds is observed, in its
        ``stats_dtype`` (the values it sees), and a unit stays constant while
        its smallest and largest values equal its first one."""
        primary._observer = self.observe

    def observe(self, a: Tensor, b: Tensor, dims: tuple[int, ...]) -> None:
        """Observe a batch of the primary statistic (units on dim 1): only the
        units still constant are read."""
        for side, (values, constant) in enumerate(((a, self.constant_a), (b, self.constant_b))):
            at = torch.nonzero(constant).flatten()
            if not at.numel():
                continue
            picked = values if at.numel() == self.n else values.index_select(1, at.to(values.device))
            low, high = picked.amin(dims), picked.amax(dims)
            same = torch.eq(low, high)
            first = self._first[side]
            if first is None:
                self._first[side] = first = torch.zeros(self.n, dtype=low.dtype, device=low.device)
                first[at.to(low.device)] = low
            else:
                same &= torch.eq(low, first[at.to(low.device)])
            constant[at] = same.cpu()

    def skip(self, a: Tensor) -> None:
        """Count a batch without adding it (see :attr:`idle`)."""
        self.count += a.numel() // a.shape[1]

    def prepare(self, a: Tensor, b: Tensor) -> tuple[_Batch, Tensor, Tensor]:
        """A batch (see :meth:`ActivationStats.update`) prepared for
        :meth:`accumulate` (in the shared scratch: add it before the next
        update), with its float64 deviation sums of A and B (computed now,
        so that a non-finite batch is seen before it is added)."""
        self._check_batch(a, b)
        batch = self._prepare(a, b)
        m2_a = batch.centred_a.square().sum(batch.dims).double()
        m2_b = batch.centred_b.square().sum(batch.dims).double()
        return batch, m2_a, m2_b

    def update(self, a: Tensor, b: Tensor) -> None:
        """Add a batch, with the cross products of the current candidates only."""
        self.accumulate(*self.prepare(a, b))

    def accumulate(self, batch: _Batch, m2_a: Tensor, m2_b: Tensor) -> None:
        """Add a batch from :meth:`prepare`."""
        mean_a, mean_b, n = batch.mean_a.double(), batch.mean_b.double(), self.n
        rows = torch.nonzero(self.rows).flatten()
        if rows.numel() == n or bool(self.cols.all()):
            self.entries += n * n
            self._merge(batch.m, mean_a, mean_b, m2_a, m2_b, self._products(batch))
            return
        others = torch.nonzero(~self.rows).flatten()
        cols = torch.nonzero(self.cols).flatten()
        self.entries += rows.numel() * n + others.numel() * cols.numel()
        blocks: list[tuple[Tensor, Tensor | None]] = []
        if rows.numel():
            blocks.append((rows, None))
        if cols.numel() and others.numel():
            blocks.append((others, cols))
        self._merge_blocks(batch, mean_a, mean_b, m2_a, m2_b, blocks)

    def _merge_blocks(
        self,
        batch: _Batch,
        mean_a: Tensor,
        mean_b: Tensor,
        m2_a: Tensor,
        m2_b: Tensor,
        blocks: list[tuple[Tensor, Tensor | None]],
    ) -> None:
        """:meth:`_merge` of ``batch`` with its cross products added at the
        ``(rows, cols)`` blocks only (``cols`` ``None``: every column), entry
        by entry the same arithmetic; each block's products are computed
        (into the shared scratch) and added before the next one's."""
        m = batch.m
        total = self.count + m
        if total == 0:
            return
        da, db = mean_a - self.mean_a, mean_b - self.mean_b
        weight = self.count * m / total
        self.m2_a += m2_a + weight * da**2
        self.m2_b += m2_b + weight * db**2
        device, here = self.mean_a.device, batch.centred_a.device
        for rows, cols in blocks:
            cross = self._products(batch, rows.to(here), None if cols is None else cols.to(here))
            at_rows, at_cols = rows.to(device), None if cols is None else cols.to(device)
            term = torch.outer(da[at_rows], db if at_cols is None else db[at_cols])
            term.mul_(weight).add_(cross)
            if at_cols is None:
                self.cross.index_add_(0, at_rows, term)
            else:
                where = (at_rows[:, None], at_cols[None, :])
                self.cross[where] = self.cross[where] + term
        self.mean_a += da * (m / total)
        self.mean_b += db * (m / total)
        self.count = total

    def merge(self, other: ActivationStats) -> ActivationStats:
        raise NotImplementedError(
            "TieBreakStats holds partial cross deviations, which cannot be merged; merge full ActivationStats instead."
        )

    def sync(self) -> None:
        if dist.is_available() and dist.is_initialized():
            raise NotImplementedError(
                "TieBreakStats cannot be all-reduced, its candidates differ per rank; use full ActivationStats instead."
            )

    def compute_blocks(self, cost: str = "correlation") -> TieBreakSimilarity:
        """The similarity (:meth:`ActivationStats.compute`) at the entries
        collected: rows of A's candidates, columns of B's."""
        _check_choice(cost, "cost", COSTS)
        if self.count == 0:
            raise DataError("TieBreakStats has no samples; call update(a, b) with at least one batch first.")
        rows, cols = torch.nonzero(self.rows).flatten(), torch.nonzero(self.cols).flatten()
        device = self.mean_a.device
        ri, ci = rows.to(device), cols.to(device)
        row_block = self._block(cost, self.cross[ri], ri, None)
        col_block = self._block(cost, self.cross[:, ci], None, ci)
        return TieBreakSimilarity(rows, row_block.cpu(), cols, col_block.cpu(), self.n)

    def _block(self, cost: str, cross: Tensor, rows: Tensor | None, cols: Tensor | None) -> Tensor:
        """:meth:`ActivationStats.compute` at ``cross = self.cross[rows][:, cols]``
        (a copy, used as scratch), entry by entry the same arithmetic."""

        def pick(vector: Tensor, at: Tensor | None) -> Tensor:
            return vector if at is None else vector[at]

        cov = cross.div_(self.count)
        if cost == "covariance":
            return cov
        var_a, var_b = self.m2_a / self.count, self.m2_b / self.count
        if cost == "euclidean":
            out = pick(var_a, rows)[:, None] + pick(var_b, cols)[None, :]
            out -= cov.mul_(2)
            gap = torch.sub(pick(self.mean_a, rows)[:, None], pick(self.mean_b, cols)[None, :], out=cov)
            out += gap.square_()
            return out.neg_()
        root_a, root_b = var_a.clamp_min(0).sqrt(), var_b.clamp_min(0).sqrt()
        # the largest entry of outer(root_a, root_b): rounding is monotone, so it is the product of the maxima
        tiny = torch.finfo(torch.float64).eps * max(float(root_a.max() * root_b.max()), 1.0)
        denom = torch.outer(pick(root_a, rows), pick(root_b, cols))
        degenerate = (denom > tiny).logical_not_()
        corr = cov.div_(denom.clamp_min_(tiny)).masked_fill_(degenerate, 0.0)
        return corr.clamp_(-1.0, 1.0)


def _centred_rows(x: Tensor, mean: Tensor, out: Tensor | None = None) -> Tensor:
    """``(P, n, Q)`` activations minus their unit means, as ``(n, P * Q)`` rows,
    written in one pass (into ``out``, of ``n * P * Q`` entries, if given)."""
    shape = (x.shape[1], x.shape[0], x.shape[2])
    target = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out.view(shape)
    torch.sub(x.transpose(0, 1), mean[:, None, None], out=target)
    return target.view(x.shape[1], -1)


def _check_stats_dtype(stats_dtype: Any) -> None:
    """Raise unless ``stats_dtype`` is ``None``, ``torch.float32`` or ``torch.float64``."""
    if stats_dtype is None or stats_dtype in STATS_DTYPES:
        return
    if not isinstance(stats_dtype, torch.dtype):
        raise ArgumentTypeError(
            f"Argument 'stats_dtype' is {_describe(stats_dtype)}; pass torch.float32, torch.float64 or None."
        )
    raise ArgumentValueError(
        f"Argument 'stats_dtype' is {stats_dtype}; pass torch.float32 or torch.float64 (or None: the "
        "activations' own precision)."
    )
