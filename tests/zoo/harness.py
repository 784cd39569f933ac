"""One check for every zoo model: :func:`run_case`.

For a :class:`Case` (a builder of a small model and of its example inputs) the
check

1. builds the model (float64, every parameter plus N(0, ``noise``^2): default
   inits make attention near-uniform and would hide a wrong head permutation;
   every dropout p=0; BatchNorm running statistics measured on a calibration
   batch, then shifted and scaled per channel at random);
2. calls ``ma.build_spec`` and checks that it neither mutated the model
   (state_dict bit for bit, requires_grad and training flags) nor the inputs,
   and that any exception is a ``ma.MaskAlignError``;
3. measures the noise floor: the output change when every parameter is
   perturbed by 1e-15 relative (4.5 epsilons; float32 models: 5.4e-7) (float32 islands inside a float64 model, or a
   chaotic deep net, show up here), which must lie 100x below the tolerance;
4. applies a random (non-identity) permutation of every group and compares
   outputs in eval mode and in train mode (BatchNorm on batch statistics,
   same RNG seed for both forwards) against the unpermuted model computed
   directly, not by maskalign; the inverse permutation restores the weights
   bit for bit;
5. negative control: for (up to ``MAX_CONTROLS``) groups, one member axis
   (a weight of >= 2 dims) permuted alone must move the output by >= 1e-3
   relative, so the comparison above could have failed;
6. records coverage, the number of groups and the most common freeze reasons.

``run_case`` never raises on a bug of the code under test: it returns a
:class:`Result` whose ``problems`` lists every violated promise, so the tests
assert ``not result.problems`` and the coverage script can tabulate them.
"""

from __future__ import annotations

import copy
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import maskalign as ma
from maskalign.spec.axes import index_vector

DT = torch.float64
KEEP_TOL = 1e-9  # float64 models: permuted outputs agree to this (relative)
CONTROL_MIN = 1e-3  # a wrong permutation must move the outputs at least this much
FLOOR_MARGIN = 100.0  # noise floor must lie this far below the tolerance
MAX_CONTROLS = 12
CONTROL_WEAK_SHARE = 0.25  # at most this share of the checked groups may be weak (dead ReLU units, a summed gate)

_DROPOUT = re.compile(r"dropout|drop_path|layerdrop|_prob$|drop_rate|pdrop|drop_connect|attn_drop|proj_drop")

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
InputsFn = Callable[[int, int], Inputs]  # (seed, batch) -> (args, kwargs)


@dataclass(frozen=True)
class Case:
    """A zoo model.

    ``build()`` returns ``(model, inputs)`` where ``inputs(seed, batch)`` gives
    ``(args, kwargs)`` of forward. ``tol``: bound on the relative output error
    of the permuted model (``KEEP_TOL`` unless the model computes parts in
    float32). ``noise``: std of the noise added to every parameter.
    ``dtype``: float64 unless a model is too big (second tier).
    ``train``: also compare in train mode. ``xfail``: a known bug someone is
    fixing (strict xfail). ``coverage``: a coverage floor that is met today.
    """

    name: str
    family: str
    build: Callable[[], tuple[nn.Module, InputsFn]]
    tol: float = KEEP_TOL
    noise: float = 0.1
    dtype: torch.dtype = DT
    train: bool = True
    xfail: str | None = None
    coverage: float | None = None
    batch: int = 2
    controls: int = 12  # at most this many groups get a negative control
    rejects: str | None = None  # build_spec must raise a MaskAlignError whose message matches this regex
    # a big model (second tier, >= 15M parameters): noise drawn in float32 (a third of the time of float64
    # draws, the same distribution), the inverse permutation checked on the state_dict (one model copy fewer)
    lite: bool = False
    bn_jitter: float = 1.0  # scale of the random shift of BatchNorm running statistics (0: as calibrated)
    note: str = ""  # why tol is looser than KEEP_TOL, or other case-specific facts


@dataclass
class Result:
    name: str
    family: str
    problems: list[str] = field(default_factory=list)
    rejected: str | None = None  # a MaskAlignError from build_spec
    coverage: float | None = None
    groups: int = 0
    frozen: int = 0
    reasons: list[tuple[str, int]] = field(default_factory=list)
    eval_error: float | None = None
    train_error: float | None = None
    floor: float | None = None  # max of the eval and train floors
    floor_eval: float | None = None
    control: float | None = None  # largest change among negative controls
    controls: int = 0
    weak: list[str] = field(default_factory=list)  # groups whose control moved the outputs < CONTROL_MIN
    sensitivity: float | None = None
    build_seconds: float = 0.0
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


# ----------------------------------------------------------------- helpers
def float_leaves(out: Any) -> list[Tensor]:
    """Floating tensors of a model output (tensor, tuple, dict, ModelOutput)."""
    if isinstance(out, Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in float_leaves(o)]
    return []


def relative_change(got: list[Tensor], expected: list[Tensor]) -> float:
    """Largest over output tensors of max |got - expected| / max |expected|."""
    if len(got) != len(expected):
        return float("inf")
    worst = 0.0
    for g, e in zip(got, expected):
        if g.shape != e.shape:
            return float("inf")
        if not e.numel():
            continue
        scale = float(e.abs().max())
        diff = float((g.to(DT) - e.to(DT)).abs().max())
        if diff != diff:  # nan
            return float("inf")
        worst = max(worst, diff / max(scale, 1e-300))
    return worst


def forward(model: nn.Module, inputs: Inputs, *, train: bool = False, seed: int = 1234) -> list[Tensor]:
    """The model's floating outputs in eval (or train) mode, with the RNG
    seeded (train mode runs on a deep copy: it updates BatchNorm statistics)."""
    args, kwargs = inputs
    if train:  # train mode writes BatchNorm statistics (and spectral_norm's vectors): on a copy
        model = copy.deepcopy(model)
    elif model.training or any(m.training for m in model.modules()):
        raise ValueError("forward(train=False) expects a model in eval mode")
    model.train(train)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    return [t.detach().clone() for t in float_leaves(out)]


def zero_dropout(config: Any) -> Any:
    """Set every dropout-like float attribute of a transformers config to 0
    (dropout would pick different units after a permutation; SpecAugment uses
    numpy's RNG)."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and re.search(_DROPOUT, key):
            setattr(config, key, 0.0)
    return config


def prepare(
    model: nn.Module,
    inputs: InputsFn,
    *,
    noise: float,
    dtype: torch.dtype,
    seed: int = 0,
    draw_dtype: torch.dtype = DT,
    bn_jitter: float = 1.0,
) -> nn.Module:
    """``model`` in ``dtype``, eval mode, noisy parameters, random BatchNorm
    statistics, every nn.Dropout at p=0."""
    model = model.to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Dropout | nn.Dropout1d | nn.Dropout2d | nn.Dropout3d | nn.AlphaDropout):
            m.p = 0.0
        for attr, value in list(vars(m).items()):  # functional dropout rates read at init, DropPath
            if isinstance(value, float) and 0.0 < value < 1.0 and _DROPOUT.search(attr):
                setattr(m, attr, 0.0)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=draw_dtype), alpha=noise)
        norms = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
        ]
        if norms:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average
            model.train()
            args, kwargs = inputs(99, 8)
            model(*_to_dtype(args, dtype), **_to_dtype(kwargs, dtype))
            for m in norms:
                m.momentum = 0.1
                n = m.num_features
                shift, scale = torch.randn(n, generator=g, dtype=DT), torch.rand(n, generator=g, dtype=DT)
                m.running_mean.add_((shift * 0.1 * bn_jitter).to(dtype) * m.running_var.sqrt())
                m.running_var.mul_(((scale - 0.5) * 0.6 * bn_jitter + 1.0).to(dtype))
                m.num_batches_tracked.zero_()
            model.eval()
    return model


def aliased(model: nn.Module) -> set[str]:
    """state_dict keys that share storage with another key (tied weights)."""
    seen: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel():
            seen.setdefault((t.data_ptr(), tuple(t.shape)), []).append(name)
    return {n for names in seen.values() if len(names) > 1 for n in names}


def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[bool], list[bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def changes(model: nn.Module, snap: tuple[dict[str, Tensor], list[bool], list[bool]]) -> list[str]:
    state, flags, grads = snap
    now = model.state_dict()
    out = []
    if now.keys() != state.keys():
        out.append(f"state_dict keys changed: {sorted(set(now) ^ set(state))[:5]}")
    else:
        bad = [k for k in now if now[k].dtype != state[k].dtype or not torch.equal(now[k], state[k])]
        if bad:
            out.append(f"state_dict tensors changed: {bad[:5]}")
    if [m.training for m in model.modules()] != flags:
        out.append("training flags changed")
    if [p.requires_grad for p in model.parameters()] != grads:
        out.append("requires_grad flags changed")
    return out


def same_inputs(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_inputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_inputs(x, y) for x, y in zip(a, b))
    return a == b


def nontrivial_permutation(spec: ma.PermutationSpec, seed: int) -> ma.Permutation:
    """A random permutation, no group left at the identity."""
    g = torch.Generator().manual_seed(seed)
    indices = {}
    for name, group in spec.groups.items():
        idx = torch.randperm(group.size, generator=g)
        indices[name] = idx.roll(1) if torch.equal(idx, torch.arange(group.size)) else idx
    return ma.Permutation(spec, indices)


def one_member_alone(model: nn.Module, spec: ma.PermutationSpec, group: str, tensor: str, dim: int) -> nn.Module:
    """A copy of ``model`` with only ``tensor``'s axis ``dim`` rolled along ``group``."""
    state = model.state_dict()
    idx = index_vector(spec.axes[tensor][dim], {group: torch.arange(spec.groups[group].size).roll(1)})
    state[tensor] = state[tensor].index_select(dim, idx)
    wrong = copy.deepcopy(model)
    wrong.load_state_dict(state)
    return wrong


def perturbed(model: nn.Module, rel: float | None = None, seed: int = 7, draw_dtype: torch.dtype = DT) -> nn.Module:
    """A copy of ``model`` with every parameter scaled by ``1 + rel * N(0, 1)``;
    ``rel`` defaults to 4.5 machine epsilons of the parameters' dtype (1e-15
    in float64, 5.4e-7 in float32, where 1e-15 would round away)."""
    g = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            if p.is_floating_point():
                scale = rel if rel is not None else (1e-15 if p.dtype == DT else 4.5 * torch.finfo(p.dtype).eps)
                p.addcmul_(p, torch.randn(p.shape, generator=g, dtype=draw_dtype), value=scale)  # p (1 + scale n)
    return other


def top_reasons(spec: ma.PermutationSpec, n: int = 3) -> list[tuple[str, int]]:
    """The most common freeze reasons (numbers and node names blurred so that
    one reason per op counts once)."""
    counts: Counter[str] = Counter()
    for axis in spec.frozen:
        reason = re.sub(r"'[^']*'", "'…'", axis.reason)
        reason = re.sub(r"\b\d+\b", "N", reason)
        counts[reason[:120]] += 1
    return counts.most_common(n)


def _short(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


# ------------------------------------------------------------------- check
def _permute(model: nn.Module, pi: ma.Permutation) -> nn.Module:
    """``apply_permutation``; a model whose forward filled a cache of tensors
    since its spec was built (LeViT's attention biases) is refused with a
    SpecError saying to clear the cache: do what it says (train() then eval()
    empties LeViT's) and permute again."""
    try:
        return ma.apply_permutation(model, pi)
    except ma.SpecError as e:
        if "appeared after its spec was built" not in str(e):
            raise
        model.train()
        model.eval()
        return ma.apply_permutation(model, pi)


def run_case(case: Case, *, built: tuple[nn.Module, InputsFn] | None = None) -> Result:
    """Run every check on ``case``; violated promises go to ``Result.problems``."""
    start = time.perf_counter()
    result = Result(case.name, case.family)
    torch.manual_seed(0)
    try:
        raw, inputs_fn = built or case.build()
        draw = torch.float32 if case.lite else DT
        model = prepare(raw, inputs_fn, noise=case.noise, dtype=case.dtype, draw_dtype=draw, bn_jitter=case.bn_jitter)
        inputs = inputs_fn(0, case.batch)
        inputs = (_to_dtype(inputs[0], case.dtype), _to_dtype(inputs[1], case.dtype))
        other_inputs = inputs_fn(1, case.batch)
        other_inputs = (_to_dtype(other_inputs[0], case.dtype), _to_dtype(other_inputs[1], case.dtype))
    except Exception as e:  # the zoo's own builder failed: not a maskalign bug
        result.problems.append(f"builder failed: {_short(e)}")
        return result
    _check(case, model, inputs, other_inputs, result)
    result.seconds = time.perf_counter() - start
    return result


def _to_dtype(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_dtype(v, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_to_dtype(v, dtype) for v in obj)
    return obj


def _check(case: Case, model: nn.Module, inputs: Inputs, other: Inputs, result: Result) -> None:
    problems = result.problems
    args, kwargs = inputs
    snap, saved_inputs = snapshot(model), copy.deepcopy(inputs)

    t0 = time.perf_counter()
    try:
        spec = ma.build_spec(model, args, kwargs or None)
    except ma.MaskAlignError as e:
        result.rejected = _short(e)
        if case.rejects is None or not re.search(case.rejects, str(e)):
            problems.append(f"build_spec rejected the model: {_short(e)}")
        spec = None
    except Exception as e:
        problems.append(f"build_spec raised an untyped {_short(e)} at {_where(e)}")
        spec = None
    result.build_seconds = time.perf_counter() - t0
    problems.extend(f"build_spec mutated the model: {c}" for c in changes(model, snap))
    if not same_inputs(inputs, saved_inputs):
        problems.append("build_spec mutated the inputs")
    if spec is None:
        return
    if case.rejects is not None:
        problems.append(f"build_spec accepted a model it should reject with {case.rejects!r}")

    result.coverage = float(spec.coverage)
    result.groups = len(spec.groups)
    result.frozen = len(spec.frozen)
    result.reasons = top_reasons(spec)
    if case.coverage is not None and spec.coverage < case.coverage:
        problems.append(f"coverage {spec.coverage:.4f} below the floor {case.coverage}")
    state = model.state_dict()
    missing = set(state) - set(spec.axes)
    if missing:
        problems.append(f"state_dict tensors missing from spec.axes: {sorted(missing)[:5]}")
    bad_shapes = [k for k, v in state.items() if k in spec.shapes and spec.shapes[k] != tuple(v.shape)]
    if bad_shapes:
        problems.append(f"spec.shapes disagree with the model: {bad_shapes[:5]}")

    expected = forward(model, inputs)
    result.sensitivity = relative_change(forward(model, other), expected)
    if result.sensitivity < 1e-2:
        problems.append(f"outputs barely depend on the inputs ({result.sensitivity:.2e}): the checks would be vacuous")
    nudged = perturbed(model, draw_dtype=torch.float32 if case.lite else DT)
    result.floor = result.floor_eval = relative_change(forward(nudged, inputs), expected)
    if case.train:
        expected_train = forward(model, inputs, train=True)
        floor_train = relative_change(forward(nudged, inputs, train=True), expected_train)
        result.floor = max(result.floor, floor_train)
    del nudged  # a model copy: big models need the memory back
    if result.floor * FLOOR_MARGIN > case.tol:
        problems.append(f"noise floor {result.floor:.2e} not {FLOOR_MARGIN:g}x below the tolerance {case.tol:.0e}")

    try:
        pi = nontrivial_permutation(spec, seed=1)
        permuted = _permute(model, pi)
    except Exception as e:
        problems.append(f"apply_permutation raised {_short(e)} at {_where(e)}")
        return
    problems.extend(f"apply_permutation mutated the model: {c}" for c in changes(model, snap))
    result.eval_error = relative_change(forward(permuted, inputs), expected)
    if not result.eval_error <= case.tol:
        problems.append(f"eval-mode outputs changed by {result.eval_error:.3e} > {case.tol:.0e} (wrong answer)")
    if case.train:
        result.train_error = relative_change(forward(permuted, inputs, train=True), expected_train)
        if not result.train_error <= case.tol:
            problems.append(f"train-mode outputs changed by {result.train_error:.3e} > {case.tol:.0e} (wrong answer)")
    if spec.groups:
        if all(torch.equal(permuted.state_dict()[k], v) for k, v in state.items()):
            problems.append("the permutation left every tensor unchanged")
        try:
            if case.lite:
                back = ma.permute_state_dict(permuted.state_dict(), pi.inverse())
                if back.keys() != state.keys() or not all(torch.equal(back[k], v) for k, v in state.items()):
                    problems.append("the inverse permutation does not restore the weights bit for bit")
            else:
                restored = _permute(permuted, pi.inverse())
                if changes(restored, (state, snap[1], snap[2])):
                    problems.append("the inverse permutation does not restore the weights bit for bit")
        except Exception as e:
            problems.append(f"inverse permutation raised {_short(e)}")
        _negative_control(model, spec, inputs, expected, result, case.controls)


def _negative_control(
    model: nn.Module,
    spec: ma.PermutationSpec,
    inputs: Inputs,
    expected: list[Tensor],
    result: Result,
    max_controls: int = MAX_CONTROLS,
) -> None:
    """Per checked group: the largest output change among (up to 3) of its
    members, each permuted alone, must reach ``CONTROL_MIN`` for all but
    ``CONTROL_WEAK_SHARE`` of the groups. (A group can be legitimately weak:
    units that a ReLU kills on these inputs; a projection that is only summed,
    as WavLM's relative-position gate, is invariant to any one member
    permuted alone.)"""
    tied = aliased(model)
    candidates = []
    for group in spec.groups.values():
        if len(group.members) < 2:
            continue
        members = [(t, d) for t, d in group.members if len(spec.shapes[t]) >= 2 and t not in tied]
        if members:
            candidates.append((group.name, members[:: max(1, len(members) // 3)][:3]))
    if not candidates:
        result.problems.append("no group has a >= 2-dim untied member: no negative control possible")
        return
    step = max(1, len(candidates) // max_controls)
    changes_by_group = {}
    for name, members in candidates[::step][:max_controls]:
        change = 0.0
        for tensor, dim in members:
            wrong = forward(one_member_alone(model, spec, name, tensor, dim), inputs)
            change = max(change, relative_change(wrong, expected))
            if change >= CONTROL_MIN:
                break
        changes_by_group[name] = change
    result.controls = len(changes_by_group)
    result.control = max(changes_by_group.values())
    result.weak = sorted(n for n, c in changes_by_group.items() if c < CONTROL_MIN)
    if result.control < CONTROL_MIN or len(result.weak) > CONTROL_WEAK_SHARE * result.controls:
        result.problems.append(
            f"negative control: {len(result.weak)} of {result.controls} groups permuted one member alone moved the "
            f"outputs < {CONTROL_MIN:g} (largest change {result.control:.2e}): {result.weak[:3]}"
        )


def _where(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "maskalign" in f.filename]
    f = (ours or frames)[-1] if (ours or frames) else None
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})" if f else "?"
