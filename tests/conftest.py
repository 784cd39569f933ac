"""Shared fixtures for the permutation / matching / LMC tests.

Small float64 reference models for 8x8 single-channel inputs, a helper that
gives every BatchNorm non-trivial statistics and affine parameters (so that a
BatchNorm tensor left unpermuted changes the model's outputs), and a cache of
permutation specs (a spec depends only on the architecture).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn

import maskalign as ma
from maskalign.models import MLP, VGG11, ResNet20

# CI runs hypothesis derandomized (the same examples every run: no flaky
# landings); locally every run explores new examples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

IMAGE_SHAPE = (1, 8, 8)

MODEL_NAMES = ("mlp", "resnet20_w1", "resnet20_w2", "vgg11")


def randomize_bn(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm layer of ``model`` random running_mean / running_var /
    weight / bias (in place, under no_grad); returns ``model``.

    Values are distinct per channel and far from the defaults (0, 1, 1, 0), so a
    permutation that forgets a BatchNorm tensor changes the outputs.
    """
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            n = module.num_features
            kw = {"generator": generator, "dtype": torch.float64}
            if module.running_mean is not None:
                module.running_mean.copy_(torch.randn(n, **kw) * 0.5)
            if module.running_var is not None:
                module.running_var.copy_(torch.rand(n, **kw) * 1.5 + 0.5)
            if module.weight is not None:
                module.weight.copy_(torch.rand(n, **kw) + 0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(n, **kw) * 0.5)
    return model


def make_model(name: str, seed: int = 0, *, bn: bool = True) -> nn.Module:
    """A float64 model in eval mode for ``(N, 1, 8, 8)`` inputs.

    ``name`` is one of :data:`MODEL_NAMES`; ``seed`` fixes the initialisation
    (and the random BatchNorm statistics when ``bn``).
    """
    torch.manual_seed(seed)
    model: nn.Module
    if name == "mlp":
        model = MLP(in_features=64)
    elif name == "resnet20_w1":
        model = ResNet20(width=1, in_channels=1)
    elif name == "resnet20_w2":
        model = ResNet20(width=2, in_channels=1)
    elif name == "vgg11":
        model = VGG11(in_channels=1, image_size=8)
    else:
        raise ValueError(f"unknown test model {name!r}")
    model = model.double().eval()
    if bn:
        randomize_bn(model, torch.Generator().manual_seed(10_000 + seed))
    return model


def make_inputs(n: int, seed: int = 0) -> Tensor:
    """``n`` random float64 images of shape ``(1, 8, 8)``."""
    return torch.randn(n, *IMAGE_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


_SPECS: dict[str, ma.PermutationSpec] = {}


def spec_for(name: str) -> ma.PermutationSpec:
    """The (cached) permutation spec of test model ``name``."""
    if name not in _SPECS:
        _SPECS[name] = ma.build_spec(make_model(name, bn=False), (make_inputs(4, seed=123),))
    return _SPECS[name]


def axis_factors(spec: ma.PermutationSpec, tensor: str, dim: int) -> list[tuple[str | None, int]]:
    """The factors ``(group or None, size)`` of ``tensor``'s axis ``dim``, in
    row-major order, size-1 factors dropped.

    Reads ``spec.axes`` in either representation: a tuple of ``(group, size)``
    factors per dim, or an axis tree (``Leaf(group, size)`` / ``Product(parts)``
    / ``Concat(parts)``, flattened to its leaves).
    """

    def leaves(node: object) -> list[tuple[str | None, int]]:
        if hasattr(node, "parts"):
            return [leaf for part in node.parts for leaf in leaves(part)]  # type: ignore[attr-defined]
        if hasattr(node, "group") and hasattr(node, "size"):
            return [(node.group, int(node.size))]  # type: ignore[attr-defined]
        if isinstance(node, tuple) and len(node) == 2 and isinstance(node[1], int) and not isinstance(node[0], tuple):
            return [(node[0], node[1])]
        if isinstance(node, tuple):
            return [leaf for item in node for leaf in leaves(item)]
        raise TypeError(f"unknown axis representation {node!r}")

    return [(g, s) for g, s in leaves(spec.axes[tensor][dim]) if s > 1]


def axis_groups(spec: ma.PermutationSpec, tensor: str, dim: int) -> list[str]:
    """Names of the groups on ``tensor``'s axis ``dim`` (empty: unpermuted)."""
    return [g for g, _ in axis_factors(spec, tensor, dim) if g is not None]


def is_permuted(spec: ma.PermutationSpec, tensor: str) -> bool:
    """Whether any axis of ``tensor`` carries a group."""
    return any(axis_groups(spec, tensor, d) for d in range(len(spec.shapes[tensor])))


def state_dicts_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    """Same keys and bit-identical tensors (same dtype and shape)."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[bool]]:
    """A deep copy of the state_dict and every submodule's training flag."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()]


def assert_unchanged(model: nn.Module, snap: tuple[dict[str, Tensor], list[bool]]) -> None:
    state, flags = snap
    assert state_dicts_equal(model.state_dict(), state), "the model's state_dict changed"
    assert [m.training for m in model.modules()] == flags, "the model's training flags changed"


def relative_error(got: Tensor, expected: Tensor) -> float:
    """max |got - expected| / max |expected| (output scale)."""
    scale = float(expected.abs().max())
    return float((got - expected).abs().max()) / max(scale, 1e-300)


@pytest.fixture(scope="session")
def model_factory() -> Callable[..., nn.Module]:
    """``model_factory(name, seed=0, bn=True)``: see :func:`make_model`."""
    return make_model


@pytest.fixture(scope="session")
def randomize_bn_fn() -> Callable[[nn.Module, torch.Generator], nn.Module]:
    """The :func:`randomize_bn` helper."""
    return randomize_bn


@pytest.fixture(scope="session")
def inputs_factory() -> Callable[..., Tensor]:
    """``inputs_factory(n, seed=0)``: see :func:`make_inputs`."""
    return make_inputs


@pytest.fixture(scope="session")
def spec_cache() -> Callable[[str], ma.PermutationSpec]:
    """``spec_cache(name)``: the cached spec of a test model (see :func:`spec_for`)."""
    return spec_for


@pytest.fixture(params=MODEL_NAMES)
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param


def aliased(model: nn.Module) -> set[str]:
    """state_dict keys that share storage with another key (tied weights)."""
    seen: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel():
            seen.setdefault((t.data_ptr(), tuple(t.shape)), []).append(name)
    return {n for names in seen.values() if len(names) > 1 for n in names}


def run_workers(fn: Callable[..., None], args: tuple[object, ...], nprocs: int, timeout: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` forked processes and wait at most
    ``timeout`` seconds: a hung collective fails the test instead of CI."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{nprocs} worker processes did not finish within {timeout:.0f} s")


# ------------------------------------------- shared by the spec and rule tests
@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small models run fastest single-threaded, and a 2-core machine shared
    with other jobs makes OpenMP's busy-waiting threads slow by 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model: nn.Module, seed: int = 0, gain: float = 1.0) -> nn.Module:
    """float64, eval, and non-trivial values for every parameter and statistic.

    Matrices/kernels: N(0, gain^2 / fan_in); vectors: N(0, 0.25) plus 1 for
    weights (normalization scales), so every channel differs; running means
    N(0, 0.25), running variances U(0.5, 2).
    """
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.dim() >= 2:
                p.copy_(noise * gain / math.sqrt(p[0].numel()))
            else:
                p.copy_(noise * 0.5 + (1.0 if name.endswith("weight") else 0.0))
        for module in model.modules():
            mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
            if isinstance(mean, Tensor) and isinstance(var, Tensor):
                mean.copy_(torch.randn(mean.shape, generator=g, dtype=mean.dtype) * 0.5)
                var.copy_(torch.rand(var.shape, generator=g, dtype=var.dtype) * 1.5 + 0.5)
    return model


class TwoHeadAttention(nn.Module):
    """A ReLU layer, 2-head self-attention (head dim 4) and a residual sum: the
    smallest model with groups nested in a joint axis (heads, head dims)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        y, _ = self.attn(h, h, h, need_weights=False)
        return self.out(torch.relu(y + h))


class CrossTied(nn.Module):
    """``b.weight`` is a transposed view of ``a.weight`` on a path where the
    graph does not tie their axes: a non-identity permutation cannot keep the
    shared storage consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4).double()
        self.h = nn.Linear(4, 4).double()
        self.b = nn.Linear(4, 4).double()
        self.b.weight = nn.Parameter(self.a.weight.t())

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.h(torch.relu(self.a(x)))))


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------ shared by the distributed reproduce tests
def run_results(out: Path) -> dict[str, Any]:
    """``out/results.json`` without what differs between equal runs: the
    timing and the number of processes."""
    results = json.loads((out / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in ("timing", "world_size")}


def assert_results_close(got: Any, expected: Any, atol: float, path: str = "") -> None:
    """Equal structure and values, floats up to ``atol``; test accuracies
    (``test_acc``, ``test_top5``: counts over the test set) exactly."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), path
        for key in expected:
            assert_results_close(got[key], expected[key], atol, f"{path}/{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_results_close(g, e, atol, f"{path}[{i}]")
    elif isinstance(expected, float) and not path.endswith(("test_acc", "test_top5")):
        assert math.isclose(got, expected, rel_tol=0, abs_tol=atol), (path, got, expected)
    else:
        assert got == expected, (path, got, expected)
