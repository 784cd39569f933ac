"""Activation matching: align the hidden units of two models by the correlation
of their activations on the same data (Li et al. 2015; Ainsworth et al.,
"Git Re-Basin", ICLR 2023, Sec. 3.1; the method used by Adnan et al., ICML 2025).

Both models run once per batch on the same inputs, through one captured graph
that returns every activation the spec needs. Per group, centred statistics
are accumulated in float64 (means, variances, cross-covariance: memory O(d^2)
per group, never the activations themselves); one linear assignment per group
then maximises the total matched similarity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .axes import unit_positions
from .capture import CapturedGraph, capture, eval_mode, normalize_inputs
from .errors import DataError, SpecError, SpecMismatchError, TraceError
from .lap import solve_lap
from .permutation import Permutation, check_same_architecture
from .spec import ActivationPoint, PermutationSpec, build_spec

__all__ = ["ActivationStats", "match_activations"]

COSTS = ("correlation", "covariance", "euclidean")


class ActivationStats:
    """Streaming statistics of paired activations ``a, b`` of shape ``(samples, n)``.

    Shaped like a torchmetrics ``Metric``: :meth:`update` per batch,
    :meth:`similarity` at the end. Accumulates in float64 around a shift (the
    first batch's means), so that variances and covariances do not lose their
    precision to cancellation when activations are large.
    """

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.n = n
        self.count = 0
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.sum_a = torch.zeros(n, **kw)
        self.sum_b = torch.zeros(n, **kw)
        self.sum_aa = torch.zeros(n, **kw)
        self.sum_bb = torch.zeros(n, **kw)
        self.sum_ab = torch.zeros(n, n, **kw)
        self.shift_a: Tensor | None = None
        self.shift_b: Tensor | None = None

    def update(self, a: Tensor, b: Tensor) -> None:
        """Add samples: ``a``, ``b`` of shape ``(samples, n)``."""
        a, b = a.double(), b.double()
        if self.shift_a is None or self.shift_b is None:
            self.shift_a, self.shift_b = a.mean(0), b.mean(0)
        a, b = a - self.shift_a, b - self.shift_b
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sum_aa += (a * a).sum(0)
        self.sum_bb += (b * b).sum(0)
        self.sum_ab += a.T @ b

    def similarity(self, cost: str = "correlation") -> Tensor:
        """``(n, n)`` similarity of A's unit i (rows) and B's unit j (columns).

        ``correlation``: Pearson correlation; a unit with zero variance (dead or
        constant) has correlation 0 with everything. ``covariance``: cross-
        covariance. ``euclidean``: minus the mean squared distance.
        """
        if self.count == 0:
            raise DataError("no samples were accumulated")
        m = self.count
        mean_a, mean_b = self.sum_a / m, self.sum_b / m
        cov = self.sum_ab / m - torch.outer(mean_a, mean_b)
        if cost == "covariance":
            return cov
        var_a = (self.sum_aa / m - mean_a**2).clamp_min(0)
        var_b = (self.sum_bb / m - mean_b**2).clamp_min(0)
        if cost == "euclidean":  # E(a_i - b_j)^2 from centred moments, without cancellation
            assert self.shift_a is not None and self.shift_b is not None
            gap = (self.shift_a + mean_a)[:, None] - (self.shift_b + mean_b)[None, :]
            return -(var_a[:, None] + var_b[None, :] - 2 * cov + gap**2)
        std_a, std_b = var_a.sqrt(), var_b.sqrt()
        denom = torch.outer(std_a, std_b)
        tiny = torch.finfo(torch.float64).eps * max(float(denom.max()), 1.0)
        corr = torch.where(denom > tiny, cov / denom.clamp_min(tiny), torch.zeros_like(cov))
        return corr.clamp_(-1.0, 1.0)


def _default_input_fn(batch: Any) -> tuple[Any, ...]:
    if isinstance(batch, (tuple, list)):
        return normalize_inputs(batch[0])
    return normalize_inputs(batch)


def _models_device_dtype(model_a: nn.Module, model_b: nn.Module) -> tuple[torch.device, torch.dtype]:
    tensors_a = list(model_a.parameters()) or list(model_a.buffers())
    tensors_b = list(model_b.parameters()) or list(model_b.buffers())
    if not tensors_a:
        raise SpecMismatchError("model_a has no parameters or buffers to match")
    dev_a, dev_b = tensors_a[0].device, tensors_b[0].device if tensors_b else tensors_a[0].device
    if dev_a != dev_b:
        raise SpecMismatchError(f"model_a is on {dev_a} but model_b is on {dev_b}; move both to one device")
    return dev_a, tensors_a[0].dtype


def _to_model(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        value = value.to(device)
        return value.to(dtype) if value.is_floating_point() else value
    return value


class _Prober:
    """Runs both models through one captured graph that returns the activation
    points. Graphs are static in shape, so each new input shape (a last,
    smaller batch) is captured once more and checked against the spec's graph."""

    def __init__(self, spec: PermutationSpec, model: nn.Module, nodes: Sequence[str]) -> None:
        if spec.captured is None:
            raise SpecError("activation matching needs a spec made by build_spec (it holds the model's graph)")
        self.model = model
        self.nodes = list(nodes)
        self.graphs: dict[tuple[Any, ...], tuple[CapturedGraph, torch.fx.GraphModule]] = {}
        self.reference = spec.captured

    def _graph_for(self, flat: list[Any]) -> tuple[CapturedGraph, torch.fx.GraphModule]:
        key = tuple(tuple(x.shape) if isinstance(x, Tensor) else x for x in flat)
        if key not in self.graphs:
            shapes = [
                tuple(n.meta["val"].shape)
                for n in self.reference.graph.nodes
                if n.op == "placeholder" and self.reference.roles[n.name].kind == "input"
            ]
            if shapes == [k for k in key if isinstance(k, tuple)]:
                captured = self.reference
            else:
                args, kwargs = pytree.tree_unflatten(flat, self.reference.input_spec)
                captured = capture(self.model, args, kwargs, check=False)
                known = {n.name for n in captured.graph.nodes}
                missing = [n for n in self.nodes if n not in known]
                if missing:
                    raise TraceError(
                        f"inputs of shapes {key} trace to a different graph (nodes {missing[:3]} are "
                        "missing); use batches of one shape (e.g. DataLoader(drop_last=True))"
                    )
            self.graphs[key] = (captured, captured.probe(self.nodes))
        return self.graphs[key]

    def __call__(self, state: dict[str, Tensor], flat: list[Any]) -> dict[str, Tensor]:
        captured, module = self._graph_for(flat)
        values = module(*captured.placeholder_values(state, flat))
        return dict(zip(self.nodes, values))


def _units(value: Tensor, point: ActivationPoint, positions: Tensor) -> Tensor:
    """``value`` as ``(samples, n)``: the group's units last, everything else
    (batch, spatial/sequence positions, other factors of the dim) samples.
    ``positions`` is ``unit_positions(point.tree, group)``, shape ``(n, R)``."""
    x = value.movedim(point.dim, -1)[..., positions.to(value.device)]  # (..., n, R)
    return x.movedim(-2, -1).reshape(-1, positions.shape[0])


def _batches(data: Iterable[Any], num_batches: int | None, progress: bool) -> Iterator[Any]:
    iterator: Iterable[Any] = data
    if progress:
        try:
            from tqdm.auto import tqdm

            total = num_batches if num_batches is not None else (len(data) if hasattr(data, "__len__") else None)  # type: ignore[arg-type]
            iterator = tqdm(data, total=total, desc="activation matching", leave=False)
        except ImportError:
            pass
    for index, batch in enumerate(iterator):
        if num_batches is not None and index >= num_batches:
            break
        yield batch


def match_activations(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    spec: PermutationSpec | None = None,
    *,
    num_batches: int | None = None,
    input_fn: Callable[[Any], Any] | None = None,
    cost: str = "correlation",
    progress: bool = True,
) -> Permutation:
    """Find the permutation that aligns ``model_a``'s hidden units to ``model_b``'s.

    For every group of the spec, the activations of all graph values that carry
    it (nonlinearity outputs; see :class:`~maskalign.spec.PermutationSpec`) are
    pooled over batch and spatial/sequence positions, and one linear assignment
    maximises the summed similarity of matched units (Git Re-Basin, Sec. 3.1).

    Args:
        model_a, model_b: two models of one architecture, on one device. Both
            are switched to eval mode for the pass and restored afterwards;
            neither is modified.
        data: a DataLoader or any iterable of batches: a tensor, or a tuple/list
            whose first element is the input (``(inputs, target)`` pairs), or
            anything that ``input_fn`` maps to forward's positional inputs.
        spec: the permutation spec; built from ``model_a`` and the first batch
            if omitted.
        num_batches: use at most this many batches.
        input_fn: maps a batch to forward's input (a tensor or a tuple).
        cost: ``"correlation"`` (Pearson, default), ``"covariance"`` or
            ``"euclidean"``.
        progress: show a tqdm progress bar (when tqdm is installed).

    Returns:
        A :class:`Permutation` ``pi`` with ``apply_permutation(model_a, pi)``
        aligned to ``model_b``. ``pi.report["groups"][name]`` holds the mean
        matched similarity before (identity) and after matching.

    Raises:
        SpecMismatchError: the models differ in parameter names or shapes, or
            sit on different devices.
        DataError: ``data`` yields no batch, or an activation is not finite
            (the message names the graph node and the batch).
        ValueError: an unknown ``cost``.
    """
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    device, dtype = _models_device_dtype(model_a, model_b)
    input_fn = input_fn or _default_input_fn
    stats: dict[str, ActivationStats] = {}
    prober: _Prober | None = None
    positions: dict[tuple[str, ActivationPoint], Tensor] = {}
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    with eval_mode(model_a, model_b), torch.no_grad():
        for index, batch in enumerate(_batches(data, num_batches, progress)):
            inputs = input_fn(batch)
            args = tuple(_to_model(x, device, dtype) for x in normalize_inputs(inputs))
            if prober is None:
                if spec is None:
                    spec = build_spec(model_a, args)
                check_same_architecture(state_a, spec, "model_a")
                check_same_architecture(state_b, spec, "model_b")
                nodes = sorted({p.node for points in spec.activations.values() for p in points})
                prober = _Prober(spec, model_a, nodes)
                stats = {g: ActivationStats(spec.groups[g].size, device) for g in spec.groups}
            flat, _ = pytree.tree_flatten((args, {}))
            acts_a, acts_b = prober(state_a, flat), prober(state_b, flat)
            for node in prober.nodes:
                for acts, which in ((acts_a, "model_a"), (acts_b, "model_b")):
                    if not torch.isfinite(acts[node]).all():
                        raise DataError(f"non-finite activation at graph node '{node}' of {which} in batch {index}")
            assert spec is not None
            for group, points in spec.activations.items():
                for point in points:
                    key = (group, point)
                    if key not in positions:
                        positions[key] = unit_positions(point.tree, group)  # type: ignore[assignment]
                    where = positions[key]
                    stats[group].update(
                        _units(acts_a[point.node], point, where), _units(acts_b[point.node], point, where)
                    )
    if spec is None or prober is None:
        raise DataError("data yielded no batches; activation matching needs at least one batch")
    indices: dict[str, Tensor] = {}
    groups_report: dict[str, dict[str, float]] = {}
    for group, group_stats in stats.items():
        if group_stats.count == 0:  # no activation carries this group: keep identity
            continue
        sim = group_stats.similarity(cost)
        idx = solve_lap(sim)
        indices[group] = idx
        ar = torch.arange(sim.shape[0])
        groups_report[group] = {
            "before": float(sim[ar, ar].mean()),
            "after": float(sim[idx, ar].mean()),
        }
    return Permutation(spec, indices, report={"method": "activation", "cost": cost, "groups": groups_report})
