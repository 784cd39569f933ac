"""Rules of tensor ops (maskalign.spec.rules.core) on models that put each op
between real layers, so that the axes it moves are hidden.

Every model is float64 with scaled-up random weights, and for each op we check

* the coverage, worked out by hand from its definition (hidden-axis units of
  parameters in groups / all non-structural hidden-axis units);
* a random permutation of the spec keeps the function (``check_equivalence``
  and an independent run of ``apply_permutation``, relative error <= 1e-10);
* a NEGATIVE CONTROL: a deliberately wrong permutation (one member axis
  permuted alone, or a frozen axis permuted consistently, as a guessing
  implementation would) moves the output by >= 1e-3 relative.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import axis_factors, randn, relative_error
from conftest import randomize as _randomize
from torch import Tensor, nn
from zoo.harness import nontrivial_permutation

import maskalign as ma
from maskalign.spec.axes import index_vector

KEEP_TOL = 1e-10
BREAK_TOL = 1e-3
DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ helpers
def randomize(model: nn.Module, seed: int = 0, gain: float = 1.5) -> nn.Module:
    """conftest.randomize with this file's default gain."""
    return _randomize(model, seed, gain)


@torch.no_grad()
def run(model: nn.Module, inputs: tuple[Any, ...]) -> Tensor:
    return model.eval()(*inputs)


def check(model: nn.Module, inputs: tuple[Any, ...], coverage: float, *, seed: int = 0) -> ma.PermutationSpec:
    """build_spec has ``coverage``; a random permutation (moving every group)
    keeps the function."""
    spec = ma.build_spec(model, inputs)
    assert spec.coverage == pytest.approx(coverage), spec.summary()
    perm = nontrivial_permutation(spec, seed)
    report = ma.check_equivalence(model, perm, inputs, rtol=KEEP_TOL)
    assert report.ok and report.max_rel <= KEEP_TOL, f"{report}\n{spec.summary()}"
    expected = run(model, inputs)
    assert float(expected.abs().max()) > 0
    assert relative_error(run(ma.apply_permutation(model, perm), inputs), expected) <= KEEP_TOL
    return spec


def with_tensors(model: nn.Module, new: dict[str, Tensor]) -> nn.Module:
    out = copy.deepcopy(model)
    state = out.state_dict()
    state.update(new)
    out.load_state_dict(state)
    return out


def permuted_alone(model: nn.Module, spec: ma.PermutationSpec, tensor: str, dim: int) -> nn.Module:
    """``model`` with only ``tensor``'s axis ``dim`` permuted (a cyclic shift of
    each of its groups), every other member of those groups left alone."""
    shifts = {name: torch.arange(spec.groups[name].size).roll(1) for name in spec.groups}
    idx = index_vector(spec.axes[tensor][dim], shifts)
    assert not torch.equal(idx, torch.arange(len(idx))), f"{tensor}[{dim}] carries no group"
    return with_tensors(model, {tensor: model.state_dict()[tensor].index_select(dim, idx)})


def permuted_consistently(model: nn.Module, axes: Sequence[tuple[str, int]], idx: Tensor) -> nn.Module:
    """``model`` with every listed axis permuted by ``idx``: what a spec that
    grouped exactly these axes would do."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for tensor, dim in axes:
        state[tensor] = state[tensor].index_select(dim, idx)
    return with_tensors(model, state)


def assert_moves(model: nn.Module, wrong: nn.Module, inputs: tuple[Any, ...], what: str) -> None:
    change = relative_error(run(wrong, inputs), run(model, inputs))
    assert change >= BREAK_TOL, f"{what} kept the output ({change:.2e})"


def assert_alone_breaks(
    model: nn.Module, spec: ma.PermutationSpec, inputs: tuple[Any, ...], tensor: str, dim: int
) -> None:
    """Negative control: ``tensor[dim]`` permuted on its own moves the output."""
    assert_moves(model, permuted_alone(model, spec, tensor, dim), inputs, f"permuting {tensor}[{dim}] alone")


def group_with(spec: ma.PermutationSpec, tensor: str, dim: int) -> ma.Group:
    """The one group that ``tensor``'s axis ``dim`` is a member of."""
    found = [g for g in spec.groups.values() if (tensor, dim) in g.members]
    assert len(found) == 1, f"{tensor}[{dim}] is in {len(found)} groups:\n{spec.summary()}"
    return found[0]


def shift(n: int) -> Tensor:
    return torch.arange(n).roll(1)


# -------------------------------------------------------------- transposes
class TransposeNet(nn.Module):
    """Linear -> a transpose that moves the hidden axis to -2 -> W2 @ (.) ->
    the inverse transpose -> Linear: the hidden axis is contracted in the
    transposed layout."""

    LAYOUTS: dict[str, tuple[tuple[int, ...], Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
        "numpy_T": ((4, 5), lambda h: h.T, lambda z: z.T),
        "t": ((4, 5), lambda h: h.t(), lambda z: z.t()),
        "matrix_H": ((4, 5), lambda h: h.H, lambda z: z.H),
        "mT": ((3, 4, 5), lambda h: h.mT, lambda z: z.mT),
        "mH": ((3, 4, 5), lambda h: h.mH, lambda z: z.mH),
        "adjoint": ((3, 4, 5), lambda h: h.adjoint(), lambda z: z.adjoint()),
        "swapdims": ((3, 4, 5), lambda h: h.swapdims(1, 2), lambda z: z.swapdims(2, 1)),
        "swapaxes": ((3, 4, 5), lambda h: h.swapaxes(-1, -2), lambda z: z.swapaxes(1, 2)),
        "movedim": ((3, 4, 2, 5), lambda h: h.movedim(-1, 2), lambda z: z.movedim(2, -1)),
        # [B, S, T, H] -> [S, B, H, T] and back
        "moveaxis": ((3, 4, 2, 5), lambda h: h.moveaxis((3, 1), (2, 0)), lambda z: z.moveaxis((2, 0), (3, 1))),
    }

    def __init__(self, op: str) -> None:
        super().__init__()
        self.shape, self.forth, self.back = self.LAYOUTS[op]
        self.fc1 = nn.Linear(5, 7)
        self.W2 = nn.Parameter(torch.empty(6, 7))
        self.b2 = nn.Parameter(torch.empty(6))
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        z = self.back(self.W2 @ self.forth(h))
        return self.out(torch.tanh(z + self.b2))


@pytest.mark.parametrize("op", list(TransposeNet.LAYOUTS))
def test_transposes(op: str) -> None:
    model = randomize(TransposeNet(op))
    x = randn(*model.shape)
    ops = [str(n.target) for n in torch.export.export(model, (x,), strict=False).graph.nodes]
    assert any(f"aten.{op}." in o for o in ops), ops
    # hidden units: fc1.weight[0] 7 + fc1.bias 7 + W2 6 + 7 + b2 6 + out.weight[1] 6, all in groups
    spec = check(model, (x,), 1.0)
    assert len(spec.groups) == 2
    assert_alone_breaks(model, spec, (x,), "W2", 1)
    assert_alone_breaks(model, spec, (x,), "W2", 0)


class FalconStyle(nn.Module):
    """Matmul-only layers written ``x @ W.T`` and a square Gram matrix
    ``W @ W.T``, whose inner axis is contracted away: a symmetry on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.empty(7, 5))
        self.G = nn.Parameter(torch.empty(7, 7))
        self.W2 = nn.Parameter(torch.empty(4, 7))
        self.W3 = nn.Parameter(torch.empty(3, 4))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(x @ self.W1.T)
        h = torch.tanh(h @ (self.G @ self.G.T) / 7)
        return torch.relu(h @ self.W2.T) @ self.W3.T


def test_matmul_with_transposed_weights_and_a_gram_matrix() -> None:
    model = randomize(FalconStyle())
    x = randn(6, 5)
    # hidden units: W1[0] 7 + G 7 + 7 + W2 4 + 7 + W3[1] 4; W1[1], W3[0] are input / output axes
    spec = check(model, (x,), 1.0)
    assert set(group_with(spec, "W1", 0).members) == {("W1", 0), ("G", 0), ("W2", 1)}
    assert set(group_with(spec, "G", 1).members) == {("G", 1)}  # G P (G P)^T = G G^T
    for tensor, dim in (("W1", 0), ("G", 0), ("W2", 1), ("W2", 0), ("W3", 1)):
        assert_alone_breaks(model, spec, (x,), tensor, dim)


# ------------------------------------------------------- dtype/shape donors
class DonorNet(nn.Module):
    """A second tensor that only donates dtype (type_as) or shape (expand_as)
    is the model input, whose axes are frozen: it must not freeze the hidden
    axis that happens to have its size."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.fc1, self.out = nn.Linear(7, 7), nn.Linear(7, 3)
        self.gain = nn.Parameter(torch.empty(7))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        if self.op == "type_as":
            h = h.type_as(x) * self.gain
        else:
            h = h * self.gain.expand_as(x)
        return self.out(h)


@pytest.mark.parametrize("op", ["type_as", "expand_as"])
def test_dtype_and_shape_donors_are_not_operands(op: str) -> None:
    model = randomize(DonorNet(op))
    x = randn(5, 7)
    # hidden units: fc1.weight[0] + fc1.bias + gain + out.weight[1], 7 each, all in groups
    spec = check(model, (x,), 1.0)
    members = {("fc1.weight", 0), ("fc1.bias", 0), ("gain", 0), ("out.weight", 1)}
    assert set(group_with(spec, "gain", 0).members) == members
    assert_alone_breaks(model, spec, (x,), "gain", 0)


# --------------------------------------------------------------- factories
class RNNCell(nn.Module):
    """``h = <constant>(B, H)``, then ``h = tanh(W x_t + U h)`` for every step."""

    def __init__(self, init: str) -> None:
        super().__init__()
        self.init = init
        self.W, self.U, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        if self.init == "new_zeros":
            h = x.new_zeros(batch, 6)
        elif self.init == "zeros":
            h = torch.zeros(batch, 6, dtype=x.dtype)
        elif self.init == "new_full":
            h = x.new_full((batch, 6), 0.5)
        else:  # an empty tensor, filled
            h = torch.empty(batch, 6, dtype=x.dtype).fill_(-0.25)
        for t in range(x.shape[1]):
            h = torch.tanh(self.W(x[:, t]) + self.U(h))
        return self.out(h)


@pytest.mark.parametrize("init", ["new_zeros", "zeros", "new_full", "empty_fill"])
def test_constant_factories_stay_free(init: str) -> None:
    model = randomize(RNNCell(init))
    x = randn(4, 3, 5)
    # hidden units: W.weight[0] + W.bias + U.weight (both axes) + U.bias + out.weight[1], 6 each
    spec = check(model, (x,), 1.0)
    assert len(spec.groups) == 1
    assert_alone_breaks(model, spec, (x,), "U.weight", 1)
    assert_alone_breaks(model, spec, (x,), "U.weight", 0)


# ---------------------------------------------------------------- indexing
class EOSPooling(nn.Module):
    """CLIP text pooling: the hidden state of each sequence's argmax token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.pos = nn.Parameter(torch.empty(5, 6))
        self.fc, self.head = nn.Linear(6, 7), nn.Linear(7, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.relu(self.fc(self.emb(ids) + self.pos))
        return self.head(h[torch.arange(h.shape[0]), ids.argmax(-1)])


def test_eos_pooling() -> None:
    model = randomize(EOSPooling())
    ids = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(0))
    # hidden units: emb.weight[1] 6 + pos[1] 6 + fc.weight 7 + 6 + fc.bias 7 + head.weight[1] 7;
    # vocabulary and token axes are structural
    spec = check(model, (ids,), 1.0)
    assert len(spec.groups) == 2
    assert_alone_breaks(model, spec, (ids,), "head.weight", 1)
    assert_alone_breaks(model, spec, (ids,), "pos", 1)


class TopOneMoE(nn.Module):
    """Top-1 mixture of experts: ``W[argmax(router(h))]`` picks each sample's
    expert weights (stacked experts indexed by data)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.router, self.head = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(5, 2)
        self.W = nn.Parameter(torch.empty(3, 6, 5))
        self.b = nn.Parameter(torch.empty(3, 5))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc(x))
        expert = self.router(h).argmax(-1)
        y = torch.bmm(h.unsqueeze(1), self.W[expert]).squeeze(1) + self.b[expert]
        return self.head(torch.relu(y))


def test_moe_expert_selection() -> None:
    model = randomize(TopOneMoE(), seed=4)
    x = randn(16, 4)
    assert len(set(run(model.router, (torch.relu(model.fc(x)),)).argmax(-1).tolist())) == 3  # every expert used
    # hidden units: fc.weight[0] 6 + fc.bias 6 + router.weight 3 + 6 + router.bias 3 + W[1] 6 + W[2] 5
    # + b[1] 5 + head.weight[1] 5 = 45; the router's expert axis (6 units) is lost to argmax
    # (indices), the stacked expert axis of W and b is a lookup index (structural)
    spec = check(model, (x,), 39 / 45)
    assert spec.frozen_share == {"aten::argmax": pytest.approx(6 / 45)}
    assert_alone_breaks(model, spec, (x,), "W", 1)
    assert_alone_breaks(model, spec, (x,), "W", 2)
    # guessing: the router's outputs permuted alone change which expert wins
    wrong = permuted_consistently(model, [("router.weight", 0), ("router.bias", 0)], shift(3))
    assert_moves(model, wrong, (x,), "permuting the router's expert axis")


class TokenSelect(nn.Module):
    """Linear -> an op that selects or gathers along a token axis -> Linear."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.fc1, self.head = nn.Linear(5, 6), nn.Linear(6, 3)
        self.register_buffer("idx", torch.tensor([3, 0, 2]), persistent=False)

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))  # [B, T, S, 6]
        if self.op == "index_select":
            y = h.index_select(1, self.idx)
        elif self.op == "gather":
            y = h.gather(1, ids[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3]))
        elif self.op == "take_along_dim":
            y = torch.take_along_dim(h, ids[:, :, None, None], dim=1)
        elif self.op == "index_adjacent":  # broadcast index shape [3, 2] replaces dims 1, 2
            y = h[:, self.idx[:, None], self.idx[None, 1:]]
        else:  # non-adjacent indices: the broadcast index dim goes first
            y = h[self.idx, :, self.idx.flip(0) % 3]
        return self.head(y)


@pytest.mark.parametrize("op", ["index_select", "gather", "take_along_dim", "index_adjacent", "index_nonadjacent"])
def test_selection_along_a_token_axis(op: str) -> None:
    model = randomize(TokenSelect(op))
    x = randn(4, 5, 3, 5)
    ids = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    # hidden units: fc1.weight[0] + fc1.bias + head.weight[1], 6 each
    spec = check(model, (x, ids), 1.0)
    assert_alone_breaks(model, spec, (x, ids), "head.weight", 1)


class HiddenSelect(nn.Module):
    """Linear -> Linear -> an op along the hidden axis itself -> Linear."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.fc0, self.fc1 = nn.Linear(5, 4), nn.Linear(4, 6)
        self.head = nn.Linear(3 if op in ("index", "topk") else 6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(torch.relu(self.fc0(x))))
        if self.op == "index":
            return self.head(h[:, [0, 2, 5]])
        if self.op == "topk":
            return self.head(h.topk(3, dim=-1).indices.to(h.dtype) * h.amax(-1, keepdim=True))
        if self.op == "argmax":
            return self.head(h) * h.argmax(-1, keepdim=True).to(h.dtype)
        if self.op == "sort":
            return self.head(h * h.sort(-1).indices.to(h.dtype))
        if self.op == "flip":
            return self.head(h.flip(-1) * h)
        if self.op == "cumsum":
            return self.head(torch.cumsum(h, -1))
        return self.head(torch.roll(h, 2))  # roll of the flattened tensor


@pytest.mark.parametrize("op", ["index", "topk", "argmax", "sort", "flip", "cumsum", "roll"])
def test_position_dependent_ops_on_the_hidden_axis_freeze(op: str) -> None:
    model = randomize(HiddenSelect(op))
    x = randn(7, 5)
    # fc0's 4 units (fc0.weight[0], fc0.bias, fc1.weight[1]) stay in a group; fc1's 6 units
    # (fc1.weight[0], fc1.bias, head.weight[1]) freeze, and so do the 3 selected positions
    # (head.weight[1] after index / topk)
    lost = 6 + 6 + (3 if op in ("index", "topk") else 6)
    spec = check(model, (x,), 12 / (12 + lost))
    assert list(spec.groups) == [group_with(spec, "fc0.weight", 0).name]
    hidden = [("fc1.weight", 0), ("fc1.bias", 0)] + ([] if op in ("index", "topk") else [("head.weight", 1)])
    wrong = permuted_consistently(model, hidden, shift(6))
    assert_moves(model, wrong, (x,), f"permuting the hidden axis through {op}")


# ------------------------------------------------------------ index writes
class TokenWrite(nn.Module):
    """Linear on K tokens -> written into T zero rows at given positions -> Linear."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.fc1, self.fc2, self.head = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 2)
        self.register_buffer("pos", torch.tensor([4, 1, 2]), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))  # [B, 3, 6]
        z = h.new_zeros(h.shape[0], 5, 6)
        if self.op == "index_put":
            z[:, self.pos] = h
        elif self.op == "index_put_accumulate":
            rows = torch.arange(h.shape[0])[:, None]
            z = z.index_put((rows, self.pos[None, :]), h, accumulate=True)
        elif self.op == "scatter":
            z = z.scatter(1, self.pos[None, :, None].expand_as(h), h)
        elif self.op == "scatter_add":
            z = z.scatter_add(1, self.pos[None, :, None].expand_as(h), h)
        elif self.op == "scatter_reduce":
            z = z.scatter_reduce(1, self.pos[None, :, None].expand_as(h), h, "amax")
        elif self.op == "index_add":
            z = z.index_add(1, self.pos, h, alpha=2.0)
        else:
            z = z.index_copy(1, self.pos, h)
        return self.head(torch.tanh(self.fc2(z)))


@pytest.mark.parametrize(
    "op", ["index_put", "index_put_accumulate", "scatter", "scatter_add", "scatter_reduce", "index_add", "index_copy"]
)
def test_writes_along_a_token_axis(op: str) -> None:
    model = randomize(TokenWrite(op))
    x = randn(3, 3, 5)
    # hidden units: fc1.weight[0] + fc1.bias + fc2.weight[1] (6 each), fc2.weight[0] + fc2.bias
    # + head.weight[1] (4 each)
    spec = check(model, (x,), 1.0)
    assert len(spec.groups) == 2
    assert_alone_breaks(model, spec, (x,), "fc2.weight", 1)


class SliceWrite(nn.Module):
    """``z[:, 1:3] = h[:, :2]`` (decomposed: slice_scatter) and select_scatter
    on a token axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))  # [B, 4, 6]
        z = h.clone()
        z[:, 1:3] = h[:, :2] * 2
        z = torch.select_scatter(z, h[:, 3], 1, 0)
        return self.head(torch.tanh(self.fc2(z)))


@pytest.mark.parametrize("decomposed", [False, True])
def test_slice_writes(decomposed: bool) -> None:
    model = randomize(SliceWrite())
    x = randn(3, 4, 5)
    program = torch.export.export(model, (x,), strict=False)
    if decomposed:
        program = program.run_decompositions()
    ops = {str(n.target) for n in program.graph.nodes}
    assert ("aten.slice_scatter.default" if decomposed else "aten.select_scatter.default") in ops, ops
    spec = ma.build_spec(program, (x,))
    # hidden units: fc1.weight[0] + fc1.bias + fc2.weight[1] (6 each), fc2.weight[0] + fc2.bias
    # + head.weight[1] (4 each)
    assert spec.coverage == 1.0, spec.summary()
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(0))
    report = ma.check_equivalence(model, perm, (x,), rtol=KEEP_TOL)
    assert report.ok and report.max_rel <= KEEP_TOL, report
    assert relative_error(run(ma.apply_permutation(model, perm), (x,)), run(model, (x,))) <= KEEP_TOL
    assert_alone_breaks(model, spec, (x,), "fc2.weight", 1)


class MaskedWrite(nn.Module):
    """``h[mask] = c`` (index_put with a boolean mask and one value) is masked_fill."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x).clone()
        h[h > 0.3] = 0.3
        return self.head(h)


def test_boolean_mask_assignment() -> None:
    model = randomize(MaskedWrite())
    x = randn(4, 3, 5)
    spec = check(model, (x,), 1.0)
    assert_alone_breaks(model, spec, (x,), "head.weight", 1)


# ------------------------------------------------------ metadata-only reads
class MetadataRead(nn.Module):
    """Reads ``h[:, :, -1].dtype`` and ``h[..., 0].size(0)`` (BART reads
    ``inputs_embeds[:, :, -1]`` for its dtype): no constraint on the hidden axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = nn.Linear(5, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        if h[:, :, -1].dtype == torch.float64:
            h = h * 2
        return self.head(h.reshape(h[..., 0].size(0), -1, 6))


def test_select_read_only_for_metadata() -> None:
    model = randomize(MetadataRead())
    x = randn(4, 3, 5)
    spec = check(model, (x,), 1.0)
    assert spec.captured is not None
    selects = [n for n in spec.captured.graph.nodes if "select" in str(n.target)]
    assert selects and all(not n.users for n in selects)  # the exporter keeps them, unused
    assert_alone_breaks(model, spec, (x,), "head.weight", 1)


# ----------------------------------------------- spatial and token windows
class Shifted(nn.Module):
    """Swin-style channels-last block: Linear -> an op along the spatial
    axes -> Linear."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.fc1, self.fc2, self.head = nn.Linear(3, 6), nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))  # [B, H, W, 6]
        if self.op == "roll":
            h = torch.roll(h, shifts=(2, -1), dims=(1, 2))
        elif self.op == "flip":
            h = h.flip(1, 2)
        elif self.op == "cumsum":
            h = h.cumsum(1) * h
        elif self.op == "cummax":
            h = h.cummax(2).values
        else:  # a causal mask on the two spatial axes
            h = torch.tril(h.movedim(-1, 1)).movedim(1, -1)
        return self.head(torch.tanh(self.fc2(h)))


@pytest.mark.parametrize("op", ["roll", "flip", "cumsum", "cummax", "tril"])
def test_ops_along_spatial_axes_pass_the_channels(op: str) -> None:
    model = randomize(Shifted(op))
    x = randn(2, 5, 4, 3)
    # hidden units: fc1.weight[0] + fc1.bias + fc2.weight[1] (6 each), fc2.weight[0] + fc2.bias
    # + head.weight[1] (4 each)
    spec = check(model, (x,), 1.0)
    assert len(spec.groups) == 2
    assert_alone_breaks(model, spec, (x,), "fc2.weight", 1)


class MixConv(nn.Module):
    """MixConv: split the channels, a depthwise conv of its own kernel size
    per chunk, concatenate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 1)
        self.dw3, self.dw5 = nn.Conv2d(2, 2, 3, padding=1, groups=2), nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.bn = nn.BatchNorm2d(6)
        self.conv2, self.fc = nn.Conv2d(6, 5, 1), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.split(torch.relu(self.conv1(x)), [2, 4], dim=1)
        h = torch.relu(self.bn(torch.cat([self.dw3(a), self.dw5(b)], 1)))
        return self.fc(self.conv2(h).mean((2, 3)))


def test_mixconv_split_with_sizes() -> None:
    model = randomize(MixConv())
    with torch.no_grad():
        model.bn.running_mean.copy_(randn(6, seed=1) * 0.5)
        model.bn.running_var.copy_(torch.rand(6, dtype=DT, generator=torch.Generator().manual_seed(2)) + 0.5)
    x = randn(2, 2, 7, 6)
    spec = check(model, (x,), 1.0)
    assert_alone_breaks(model, spec, (x,), "dw5.weight", 0)
    assert_alone_breaks(model, spec, (x,), "conv2.weight", 1)


# ----------------------------------------------------------------- repeats
class GQARepeat(nn.Module):
    """GQA key/value head expansion: [B, T, kv, d] -> repeat_interleave(2, dim=2)."""

    def __init__(self) -> None:
        super().__init__()
        self.kv = nn.Linear(5, 3 * 4)
        self.proj, self.head = nn.Linear(6 * 4, 7), nn.Linear(7, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.kv(x)).unflatten(-1, (3, 4))
        h = h.repeat_interleave(2, dim=2).flatten(-2)
        return self.head(torch.relu(self.proj(h)))


def test_repeat_interleave() -> None:
    model = randomize(GQARepeat())
    x = randn(2, 4, 5)
    # hidden units: kv.weight[0] 12 + kv.bias 12 + proj.weight[1] 24 (kv 3 x copies 2 x d 4, the
    # copies a free factor of their own) + proj.weight[0] 7 + proj.bias 7 + head.weight[1] 7
    spec = check(model, (x,), 1.0)
    assert sorted(s for s in (g.size for g in spec.groups.values())) == [2, 3, 4, 7]
    assert_alone_breaks(model, spec, (x,), "proj.weight", 1)
    # guessing the tile layout [copies, kv, d] of repeat instead of [kv, copies, d]
    p = shift(3)
    kv_rows = (p[:, None] * 4 + torch.arange(4)).reshape(-1)
    tiled_cols = (torch.arange(2)[:, None, None] * 12 + p[None, :, None] * 4 + torch.arange(4)).reshape(-1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["kv.weight"], state["kv.bias"] = state["kv.weight"][kv_rows], state["kv.bias"][kv_rows]
    state["proj.weight"] = state["proj.weight"][:, tiled_cols]
    assert_moves(model, with_tensors(model, state), (x,), "the repeat layout")


# ----------------------------------------------------- unfold, im2col, fold
class Patches(nn.Module):
    """VOLO / HaloNet style patch extraction between real layers."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        if op == "im2col":  # conv -> F.unfold -> Linear over C*2*2
            self.pre, self.post = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 4, 5)
        elif op == "col2im":  # Linear to C*2*2 -> F.fold -> conv
            self.pre, self.post = nn.Linear(4, 3 * 4), nn.Conv2d(3, 5, 3, padding=1)
        else:  # Linear -> Tensor.unfold along tokens -> Linear over C*3
            self.pre, self.post = nn.Linear(4, 3), nn.Linear(3 * 3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.pre(x))
        if self.op == "im2col":
            h = self.post(F.unfold(h, 2, stride=2).transpose(1, 2))
        elif self.op == "col2im":
            h = self.post(F.fold(h.transpose(1, 2), (4, 6), 2, stride=2)).flatten(2).transpose(1, 2)
        else:
            h = self.post(h.unfold(1, 3, 1).flatten(-2))
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("op", ["im2col", "col2im", "unfold"])
def test_patches(op: str) -> None:
    model = randomize(Patches(op))
    x = {"im2col": randn(2, 2, 4, 6), "col2im": randn(2, 6, 4), "unfold": randn(2, 6, 4)}[op]
    # hidden units: pre's 3 channels (pre.weight[0], pre.bias, the channel factor of the patch
    # axis of post; kernel positions are structural) and post's 5 (post.weight[0], post.bias,
    # head.weight[1]): all in groups
    spec = check(model, (x,), 1.0)
    assert sorted(g.size for g in spec.groups.values()) == [3, 5]
    patched = ("post.weight", 1) if op != "col2im" else ("pre.weight", 0)
    assert_alone_breaks(model, spec, (x,), *patched)
    # guessing the channel factor inner ([window, C]) instead of outer ([C, window])
    window = 3 if op == "unfold" else 4
    p = shift(3)
    wrong_patch = (torch.arange(window)[:, None] * 3 + p[None, :]).reshape(-1)
    axes = {"im2col": [("pre.weight", 0), ("pre.bias", 0)], "col2im": [("post.weight", 1)]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for tensor, dim in axes.get(op, [("pre.weight", 0), ("pre.bias", 0)]):
        state[tensor] = state[tensor].index_select(dim, p)
    tensor, dim = patched
    if op == "col2im":
        state["pre.weight"], state["pre.bias"] = state["pre.weight"][wrong_patch], state["pre.bias"][wrong_patch]
    else:
        state[tensor] = state[tensor].index_select(dim, wrong_patch)
    assert_moves(model, with_tensors(model, state), (x,), "the channel-outer patch layout")


# ------------------------------------------------------------------ shuffles
class Shuffle(nn.Module):
    """Conv -> a channel/pixel shuffle -> conv."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        c_in, c_out = {"pixel_shuffle": (12, 3), "pixel_unshuffle": (3, 12)}.get(op, (6, 6))
        groups = 1 if op.startswith("pixel") else 2
        self.conv0 = nn.Conv2d(2, 4, 1)
        self.conv1 = nn.Conv2d(4, c_in, 3, padding=1, groups=groups)
        self.conv2, self.fc = nn.Conv2d(c_out, 5, 3, padding=1), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        if self.op == "pixel_shuffle":
            h = F.pixel_shuffle(h, 2)
        elif self.op == "pixel_unshuffle":
            h = F.pixel_unshuffle(h, 2)
        elif self.op == "channel_shuffle":
            h = F.channel_shuffle(h, 2)
        else:  # ShuffleNet's view / transpose / reshape
            n, c, height, width = h.shape
            h = h.view(n, 2, c // 2, height, width).transpose(1, 2).reshape(n, c, height, width)
        return self.fc(self.conv2(h).mean((2, 3)))


@pytest.mark.parametrize("op", ["pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "view_transpose"])
def test_shuffles(op: str) -> None:
    model = randomize(Shuffle(op))
    x = randn(2, 2, 4, 6)
    # every hidden unit is in a group; pixel_(un)shuffle's sub-pixel factors are spatial (structural)
    spec = check(model, (x,), 1.0)
    assert_alone_breaks(model, spec, (x,), "conv2.weight", 1)
    if op.startswith("pixel"):
        wide = ("conv1.weight", 0) if op == "pixel_shuffle" else ("conv2.weight", 1)
        assert [s for _, s in axis_factors(spec, *wide)] == [3, 2, 2]
        return
    # guessing that the shuffle keeps channel order
    wrong = permuted_consistently(model, [("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)], shift(6))
    assert_moves(model, wrong, (x,), "permuting the channels as if unshuffled")


# ----------------------------------------------------------------- diagonal
class DiagonalNet(nn.Module):
    """``h @ W + h * diag(W)``: the diagonal ties W's two axes together."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset
        self.fc1, self.head = nn.Linear(5, 6), nn.Linear(6, 2)
        self.W = nn.Parameter(torch.empty(6, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.fc1(x))
        d = torch.diagonal(self.W, self.offset)
        g = h @ self.W + (h * d if self.offset == 0 else F.pad(d, (0, self.offset)) * h)
        return self.head(torch.tanh(g))


@pytest.mark.parametrize("offset", [0, 1])
def test_diagonal(offset: int) -> None:
    model = randomize(DiagonalNet(offset))
    x = randn(4, 5)
    if offset == 0:  # hidden units: fc1.weight[0] + fc1.bias + W (both axes) + head.weight[1], 6 each
        spec = check(model, (x,), 1.0)
        assert len(spec.groups) == 1
        assert_alone_breaks(model, spec, (x,), "W", 1)
        assert_alone_breaks(model, spec, (x,), "W", 0)
    else:  # the off-diagonal band freezes both axes of W, and with them everything
        spec = check(model, (x,), 0.0)
        axes = [("fc1.weight", 0), ("fc1.bias", 0), ("W", 0), ("W", 1), ("head.weight", 1)]
        wrong = permuted_consistently(model, axes, torch.tensor([2, 0, 5, 1, 4, 3]))
        assert_moves(model, wrong, (x,), "permuting past the band")


# ------------------------------------------------------------- elementwise
class MaskingNet(nn.Module):
    """where with a scalar, masked_fill with a mask, the aliases multiply /
    divide, clamp with tensor bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.head = nn.Linear(5, 6), nn.Linear(6, 2)
        self.lo, self.hi = nn.Parameter(torch.empty(6)), nn.Parameter(torch.empty(6))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = torch.where(h > 0.5, h, 0.5).masked_fill(h < -1.0, 0.0)
        h = torch.divide(torch.multiply(h, self.lo), self.hi.abs() + 0.5)
        return self.head(h.clamp(self.lo + 0.6, self.hi + 1.2))


def test_masking_ops() -> None:
    model = randomize(MaskingNet())
    x = randn(8, 5)
    # hidden units: fc1.weight[0] + fc1.bias + lo + hi + head.weight[1], 6 each
    spec = check(model, (x,), 1.0)
    assert_alone_breaks(model, spec, (x,), "lo", 0)
    assert_alone_breaks(model, spec, (x,), "hi", 0)


class SelectThirds(nn.Module):
    """A packed projection taken apart by ``select``: every index (q, k, v of
    nn.MultiheadAttention) or only some of them."""

    def __init__(self, indices: tuple[int, ...]) -> None:
        super().__init__()
        self.indices = indices
        self.proj = nn.Linear(4, 3 * 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        parts = self.proj(x).unflatten(-1, (3, 6))
        h = sum(torch.tanh(parts[..., i, :]) for i in self.indices)
        return self.out(h)


def test_select_of_every_index_is_a_stacked_index_not_a_lost_axis() -> None:
    x = torch.randn(5, 4, dtype=DT)
    every = randomize(SelectThirds((0, 1, 2)))
    spec = ma.build_spec(every, x)
    # proj rows Product(3, 6): the 3 is structural, the 6 one group with proj.bias and out's columns
    assert spec.coverage == 1.0 and not spec.frozen_share
    assert ma.check_equivalence(every, ma.random_permutation(spec, torch.Generator().manual_seed(0)), x)
    # some indices only: the 3-axis is a hidden axis lost to select (3 of proj.weight's 3 + 6 rows,
    # 3 of proj.bias's 3 + 6): (6 + 6 + 6) / (9 + 9 + 6)
    some = randomize(SelectThirds((0, 2)))
    spec = ma.build_spec(some, x)
    assert spec.coverage == pytest.approx(18 / 24)
    assert set(spec.frozen_share) == {"aten::select"}


class Broadcast(nn.Module):
    """Falcon's multi-query attention broadcasts its key/value heads with
    ``broadcast_to``: the broadcast axes are new, the others pass through."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x))[:, None, :].broadcast_to(x.shape[0], 3, 6)
        return self.fc2(h * torch.arange(1.0, 4.0, dtype=x.dtype)[None, :, None]).sum(1)


def test_broadcast_to_passes_the_broadcast_operands_axes() -> None:
    model = randomize(Broadcast())
    x = randn(5, 4)
    spec = ma.build_spec(model, x)
    assert spec.coverage == 1.0 and len(spec.groups) == 1
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(0))
    assert ma.check_equivalence(model, perm, x)
    wrong = ma.apply_permutation(model, perm)
    with torch.no_grad():
        wrong.fc2.weight.copy_(model.fc2.weight)  # the hidden axis permuted on fc1 only
        assert relative_error(wrong(x), model(x)) > BREAK_TOL


class SlicedProjection(nn.Module):
    """Phi-3's fused projection taken apart with slices ``h[..., :4]``,
    ``h[..., 4:]`` (a split), or with slices that leave a gap."""

    def __init__(self, cuts: tuple[tuple[int | None, int | None], ...]) -> None:
        super().__init__()
        self.cuts = cuts
        self.proj = nn.Linear(4, 12)
        self.heads = nn.ModuleList(nn.Linear(len(range(12)[slice(a, b)]), 2) for a, b in cuts)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        return sum(head(torch.tanh(h[..., a:b])) for head, (a, b) in zip(self.heads, self.cuts))


def test_slices_that_tile_an_axis_split_it() -> None:
    x = randn(5, 4)
    model = randomize(SlicedProjection(((None, 4), (4, 9), (9, None))))
    spec = ma.build_spec(model, x)
    assert spec.coverage == 1.0 and sorted(g.size for g in spec.groups.values()) == [3, 4, 5]
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(0))
    assert ma.check_equivalence(model, perm, x)
    # negative control: the whole 12-axis permuted as one block (ignoring the cuts) moves the output
    wrong = ma.apply_permutation(model, perm)
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wrong.proj.weight.copy_(model.proj.weight[idx])
        wrong.proj.bias.copy_(model.proj.bias[idx])
        assert relative_error(wrong(x), model(x)) > BREAK_TOL
    # slices that leave a gap (rows 4-5 unused) are no split: the sliced axis freezes
    gap = randomize(SlicedProjection(((None, 4), (6, None))))
    spec = ma.build_spec(gap, x)
    assert "aten::slice" in spec.frozen_share
    assert ma.check_equivalence(gap, ma.random_permutation(spec, torch.Generator().manual_seed(0)), x)
