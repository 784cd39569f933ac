"""Rules of layers and contractions (maskalign.spec.rules.layers / .contraction) on
models that put each op between real layers.

Every model is float64 with scaled-up random weights (so that attention is far
from uniform and gates far from saturation or linearity), and for each op we
check

* the coverage, worked out by hand from its definition (hidden-axis units of
  parameters in groups / all non-structural hidden-axis units);
* a random permutation of the spec keeps the function in eval mode
  (``check_equivalence``, relative error <= 1e-10) and, where the op differs
  in training, in train mode (dropout 0);
* a NEGATIVE CONTROL: one member axis permuted alone moves the output by
  >= 1e-3 relative, so the positive checks can fail.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import randn, relative_error
from conftest import randomize as _randomize
from torch import Tensor, nn

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


def first(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def check(
    model: nn.Module, inputs: tuple[Any, ...], coverage: float, *, train: bool = False, seed: int = 0
) -> ma.PermutationSpec:
    """build_spec has ``coverage``; a random permutation keeps the function in
    eval mode (and in train mode when ``train``)."""
    spec = ma.build_spec(model, inputs)
    assert spec.coverage == pytest.approx(coverage), spec.summary()
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(seed))
    report = ma.check_equivalence(model, perm, inputs, rtol=KEEP_TOL)
    assert report.ok and report.max_rel <= KEEP_TOL, f"{report}\n{spec.summary()}"
    if train:
        a, b = copy.deepcopy(model).train(), ma.apply_permutation(model, perm).train()
        with torch.no_grad():
            torch.manual_seed(0)
            expected = first(a(*inputs))
            torch.manual_seed(0)
            assert relative_error(first(b(*inputs)), expected) <= KEEP_TOL
        moved = ma.apply_permutation(a, perm)
        for name, buffer in b.named_buffers():  # in-place updates (spectral norm's u, v) stay consistent
            assert relative_error(buffer.double(), moved.get_buffer(name).double()) <= KEEP_TOL, name
    return spec


def permuted_alone(model: nn.Module, spec: ma.PermutationSpec, tensor: str, dim: int) -> nn.Module:
    """``model`` with only ``tensor``'s axis ``dim`` permuted (a cyclic shift of
    each of its groups), every other member of those groups left alone."""
    shifts = {name: torch.arange(spec.groups[name].size).roll(1) for name in spec.groups}
    idx = index_vector(spec.axes[tensor][dim], shifts)
    assert not torch.equal(idx, torch.arange(len(idx))), f"{tensor}[{dim}] carries no group"
    out = copy.deepcopy(model)
    state = out.state_dict()
    state[tensor] = state[tensor].index_select(dim, idx)
    out.load_state_dict(state)
    return out


def assert_breaks(model: nn.Module, spec: ma.PermutationSpec, inputs: tuple[Any, ...], tensor: str, dim: int) -> None:
    """Negative control: ``tensor[dim]`` permuted on its own moves the output."""
    with torch.no_grad():
        expected = first(model(*inputs))
        change = relative_error(first(permuted_alone(model, spec, tensor, dim)(*inputs)), expected)
    assert change >= BREAK_TOL, f"permuting {tensor}[{dim}] alone kept the output ({change:.2e})"


def groups_of(spec: ma.PermutationSpec, tensor: str, dim: int) -> list[str]:
    """The groups on ``tensor``'s axis ``dim``, in row-major order."""

    def leaves(node: Any) -> list[str]:
        if hasattr(node, "parts"):
            return [g for part in node.parts for g in leaves(part)]
        return [node.group] if node.group is not None else []

    return leaves(spec.axes[tensor][dim])


# ------------------------------------------------------------------ einsum
class Einsum(nn.Module):
    """Linear -> einsum with a weight -> (transpose) -> Linear."""

    def __init__(self, equation: str, weight: tuple[int, ...], transpose: bool = False) -> None:
        super().__init__()
        self.equation, self.transpose = equation, transpose
        self.fc1 = nn.Linear(5, 7)
        self.w = nn.Parameter(torch.empty(weight))
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum(self.equation, torch.tanh(self.fc1(x)), self.w)
        return self.fc2(y.transpose(1, 2) if self.transpose else y)


@pytest.mark.parametrize(
    ("equation", "weight", "shape", "transpose"),
    [
        ("bi,oi", (6, 7), (4, 5), False),  # implicit output "bo": the silent-wrong-answer regression
        ("bti,io", (7, 6), (2, 4, 5), True),  # implicit output "bot" (alphabetical), not "bto"
        ("...i,oi", (6, 7), (2, 4, 5), False),  # implicit with ellipsis: "...o"
        ("...i,...io->...o", (1, 7, 6), (2, 4, 5), False),  # ellipsis broadcast against a size-1 dim
    ],
)
def test_einsum_output_subscripts(
    equation: str, weight: tuple[int, ...], shape: tuple[int, ...], transpose: bool
) -> None:
    model = randomize(Einsum(equation, weight, transpose))
    x = randn(*shape)
    # hidden units: fc1 rows + bias (7 + 7), w's 7 and 6, fc2 columns 6: all grouped
    spec = check(model, (x,), 1.0)
    assert len(spec.groups) == 2
    w_in = 0 if equation.endswith(",io") else weight.index(7)
    assert groups_of(spec, "w", w_in) == groups_of(spec, "fc1.weight", 0)
    assert groups_of(spec, "w", len(weight) - 1 - w_in if len(weight) == 2 else 2) == groups_of(spec, "fc2.weight", 1)
    assert_breaks(model, spec, (x,), "w", w_in)
    assert_breaks(model, spec, (x,), "fc2.weight", 1)


class Diagonal(nn.Module):
    """A diagonal (``ii->i``) and a trace (``ii``) of one square weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)
        self.w = nn.Parameter(torch.empty(7, 7))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)) * torch.einsum("ii->i", self.w)) + torch.einsum("ii", self.w)


def test_einsum_repeated_letter_permutes_both_axes_alike() -> None:
    model = randomize(Diagonal())
    x = randn(4, 5)
    spec = check(model, (x,), 1.0)
    assert groups_of(spec, "w", 0) == groups_of(spec, "w", 1) == groups_of(spec, "fc1.weight", 0)
    assert_breaks(model, spec, (x,), "w", 0)


# ------------------------------------------------------------------ recurrent layers
class Recurrent(nn.Module):
    """Linear -> RNN / LSTM / GRU -> Linear on the outputs; with
    ``given_state``, the initial state comes from another Linear (one tensor
    for every layer and direction)."""

    def __init__(self, cls: type[nn.RNNBase], given_state: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.rnn = cls(7, 6, **kwargs)
        self.stacked = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        self.h0 = nn.Linear(5, 6) if given_state else None
        self.fc2 = nn.Linear((self.rnn.proj_size or 6) * (2 if self.rnn.bidirectional else 1), 3)

    def forward(self, x: Tensor) -> Tensor:
        state = None
        if self.h0 is not None:
            h0 = torch.tanh(self.h0(x[:, 0] if self.rnn.batch_first else x[0])).expand(self.stacked, -1, -1)
            state = (h0, 0.5 * h0) if isinstance(self.rnn, nn.LSTM) else h0
        return self.fc2(self.rnn(self.fc1(x), state)[0])


RECURRENT = [
    (nn.LSTM, {}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True, "proj_size": 4, "batch_first": True}),
    (nn.GRU, {"num_layers": 2, "batch_first": True}),
    (nn.GRU, {"bidirectional": True}),
    (nn.RNN, {"num_layers": 2, "nonlinearity": "relu"}),
    (nn.RNN, {"bidirectional": True, "bias": False}),
]


@pytest.mark.parametrize(("cls", "kwargs"), RECURRENT, ids=lambda v: str(v) if isinstance(v, dict) else v.__name__)
def test_recurrent_hidden_units_are_permutable(cls: type[nn.RNNBase], kwargs: dict[str, Any]) -> None:
    model = randomize(Recurrent(cls, **kwargs))
    x = randn(4, 3, 5)
    # every hidden axis is grouped (gate blocks are structural): coverage 1.0 (was 0.0: aten::lstm froze all)
    spec = check(model, (x,), 1.0, train=True)
    rnn = model.rnn
    cells = rnn.num_layers * (2 if rnn.bidirectional else 1)
    assert len(spec.groups) == 1 + cells * (2 if rnn.proj_size else 1)
    assert groups_of(spec, "rnn.weight_ih_l0", 1) == groups_of(spec, "fc1.weight", 0)
    hidden = groups_of(spec, "rnn.weight_hh_l0", 0)
    assert len(hidden) == 1 and spec.groups[hidden[0]].size == 6
    if rnn.bias:
        assert groups_of(spec, "rnn.bias_ih_l0", 0) == groups_of(spec, "rnn.bias_hh_l0", 0) == hidden
    state = groups_of(spec, "rnn.weight_hh_l0", 1)
    assert state == (groups_of(spec, "rnn.weight_hr_l0", 0) if rnn.proj_size else hidden)
    last = rnn.num_layers - 1
    outputs = [groups_of(spec, f"rnn.weight_hh_l{last}{s}", 1)[0] for s in ("", "_reverse")[: 1 + rnn.bidirectional]]
    assert groups_of(spec, "fc2.weight", 1) == outputs  # bidirectional: Concat(forward, backward)
    if last:
        assert groups_of(spec, "rnn.weight_ih_l1", 1) == [
            groups_of(spec, f"rnn.weight_hh_l0{s}", 1)[0] for s in ("", "_reverse")[: 1 + rnn.bidirectional]
        ]
    for tensor, dim in [("rnn.weight_hh_l0", 1), ("rnn.weight_hh_l0", 0), ("rnn.weight_ih_l0", 1), ("fc2.weight", 1)]:
        assert_breaks(model, spec, (x,), tensor, dim)
    if rnn.proj_size:
        assert_breaks(model, spec, (x,), "rnn.weight_hr_l0", 1)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("stacked", [False, True])
def test_recurrent_given_initial_state_ties_every_layer(cls: type[nn.RNNBase], stacked: bool) -> None:
    kwargs: dict[str, Any] = {"num_layers": 2, "bidirectional": True} if stacked else {}
    model = randomize(Recurrent(cls, given_state=True, **kwargs))
    x = randn(4, 3, 5)
    spec = check(model, (x,), 1.0, train=True)
    # h0 has one feature axis for all layers and directions: every cell shares h0.weight's group
    assert len(spec.groups) == 2
    assert groups_of(spec, "rnn.weight_hh_l0", 1) == groups_of(spec, "h0.weight", 0)
    assert_breaks(model, spec, (x,), "h0.weight", 0)
    assert_breaks(model, spec, (x,), "rnn.weight_hh_l0", 0)


class CellLoop(nn.Module):
    """Linear -> an RNN/LSTM/GRU cell unrolled over time -> Linear on the last state."""

    def __init__(self, cls: type[nn.RNNCellBase], given_state: bool) -> None:
        super().__init__()
        self.fc1, self.cell, self.fc2 = nn.Linear(5, 7), cls(7, 6), nn.Linear(6, 3)
        self.h0 = nn.Linear(5, 6) if given_state else None

    def forward(self, x: Tensor) -> Tensor:
        state: Any = None
        if self.h0 is not None:
            h0 = torch.tanh(self.h0(x[0]))
            state = (h0, 0.5 * h0) if isinstance(self.cell, nn.LSTMCell) else h0
        for t in range(x.shape[0]):
            state = self.cell(self.fc1(x[t]), state)
        return self.fc2(first(state))


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
@pytest.mark.parametrize("given_state", [False, True])
def test_recurrent_cells(cls: type[nn.RNNCellBase], given_state: bool) -> None:
    model = randomize(CellLoop(cls, given_state))
    x = randn(4, 3, 5)
    spec = check(model, (x,), 1.0, train=True)  # was 0.0 (aten::lstm_cell froze every axis)
    hidden = groups_of(spec, "cell.weight_hh", 1)
    assert groups_of(spec, "cell.weight_hh", 0) == groups_of(spec, "fc2.weight", 1) == hidden
    assert len(spec.groups) == 2
    for tensor, dim in [("cell.weight_hh", 1), ("cell.weight_ih", 0), ("cell.bias_hh", 0), ("fc2.weight", 1)]:
        assert_breaks(model, spec, (x,), tensor, dim)


# ------------------------------------------------------------------ weight reparametrizations
class Reparametrized(nn.Module):
    """Linear -> reparametrized Linear -> Linear, or the same with Conv1d
    (``groups`` for the middle conv, like WavLM's positional convolution)."""

    def __init__(self, wrap: Any, conv: bool = False, groups: int = 1, **kwargs: Any) -> None:
        super().__init__()
        if conv:
            self.fc1, self.fc2 = nn.Conv1d(3, 8, 3), nn.Conv1d(8, 2, 3)
            self.mid = wrap(nn.Conv1d(8, 8, 3, padding=1, groups=groups), **kwargs)
        else:
            self.fc1, self.mid, self.fc2 = nn.Linear(5, 7), wrap(nn.Linear(7, 6), **kwargs), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.mid(torch.tanh(self.fc1(x)))))


def _parametrized(name: str) -> Any:
    from torch.nn.utils import parametrizations

    return getattr(parametrizations, name)


def _legacy_weight_norm(module: nn.Module, **kwargs: Any) -> nn.Module:
    with pytest.warns(FutureWarning):
        return torch.nn.utils.weight_norm(module, **kwargs)


@pytest.mark.filterwarnings("ignore:The tensor attribute self.mid.weight was assigned during export")
@pytest.mark.parametrize(
    ("wrap", "conv", "kwargs", "g", "v"),
    [
        # g [6, 1] shares v's rows; coverage before: 0.0 (aten::_weight_norm froze every axis)
        ("weight_norm", False, {}, "parametrizations.weight.original0", "parametrizations.weight.original1"),
        ("legacy", False, {}, "weight_g", "weight_v"),
        # WavLM's positional conv: grouped, norm over every axis but the kernel's (g [1, 1, 3])
        (
            "weight_norm",
            True,
            {"dim": 2, "groups": 2},
            "parametrizations.weight.original0",
            "parametrizations.weight.original1",
        ),
        ("legacy", True, {"dim": None}, "weight_g", "weight_v"),  # one norm of the whole weight: g is a scalar
    ],
)
def test_weight_norm(wrap: str, conv: bool, kwargs: dict[str, Any], g: str, v: str) -> None:
    fn = _legacy_weight_norm if wrap == "legacy" else _parametrized(wrap)
    model = randomize(Reparametrized(fn, conv, **kwargs))
    x = randn(4, 3, 9) if conv else randn(4, 5)
    spec = check(model, (x,), 1.0, train=True)
    g_shape = spec.shapes[f"mid.{g}"]
    if len(g_shape) and g_shape[0] > 1:
        assert groups_of(spec, f"mid.{g}", 0) == groups_of(spec, f"mid.{v}", 0) == groups_of(spec, "mid.bias", 0)
        assert_breaks(model, spec, (x,), f"mid.{g}", 0)
    assert groups_of(spec, f"mid.{v}", 1) and groups_of(spec, "fc2.weight", 1) == groups_of(spec, f"mid.{v}", 0)
    assert_breaks(model, spec, (x,), f"mid.{v}", 0)
    assert_breaks(model, spec, (x,), f"mid.{v}", 1)


@pytest.mark.parametrize("conv", [False, True])
def test_spectral_norm_permutes_u_and_v_with_the_weight(conv: bool) -> None:
    model = randomize(Reparametrized(_parametrized("spectral_norm"), conv))
    x = randn(4, 3, 9) if conv else randn(4, 5)
    with torch.no_grad():  # u, v: converged power iteration of the random weight, as after training
        model.mid.parametrizations.weight[0]._power_method(model.mid.parametrizations.weight.original.flatten(1), 50)
    # linear: hidden units 7 + 7 (fc1) + 6 + 7 (W) + 6 (bias) + 6 (fc2 columns); before: vdot froze W's rows
    # and everything they meet, 21 / 39 left
    spec = check(model, (x,), 1.0, train=True)
    w, u, v = (f"mid.parametrizations.weight.{n}" for n in ("original", "0._u", "0._v"))
    assert groups_of(spec, u, 0) == groups_of(spec, w, 0) == groups_of(spec, "fc2.weight", 1)
    assert groups_of(spec, v, 0) == groups_of(spec, w, 1)  # conv: v indexes Product(in, k)
    for tensor, dim in [(u, 0), (v, 0), (w, 0), (w, 1)]:
        assert_breaks(model, spec, (x,), tensor, dim)


# ------------------------------------------------------------------ attention
def scaled(model: nn.Module, seed: int = 0) -> nn.Module:
    """``randomize`` with gain 3 for matrices: attention far from uniform."""
    return randomize(model, seed, gain=3.0)


class EncoderLayer(nn.Module):
    """Linear -> nn.TransformerEncoderLayer (packed in_proj_weight) -> Linear."""

    def __init__(self, batch_first: bool, norm_first: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.layer(self.fc1(x)))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_layer_packed_in_proj(batch_first: bool, norm_first: bool) -> None:
    model = scaled(EncoderLayer(batch_first, norm_first))
    x = randn(2, 3, 5)
    # hidden units: fc1 8 + 8; in_proj rows Product(3, heads 2, head_dim 4) = 9 (+ bias 9), columns 8;
    # out_proj 8 + 6 (+ 8); linear1 16 + 8 (+ 16); linear2 8 + 16 (+ 8); norms 4 x 8; fc2 columns 8: 176.
    # The slow path selects q, k, v off the 3-axis (aten::select) index by index: a stacked index
    # (structural), so 170 / 170.
    spec = ma.build_spec(model, (x,))
    check(model, (x,), 1.0, train=True)
    w = "layer.self_attn.in_proj_weight"
    heads, head_dim = groups_of(spec, w, 0)[-2:]
    assert (spec.groups[heads].size, spec.groups[head_dim].size) == (2, 4)
    assert groups_of(spec, "layer.self_attn.out_proj.weight", 1) == [heads, head_dim]
    assert groups_of(spec, w, 1) == groups_of(spec, "fc1.weight", 0) == groups_of(spec, "layer.linear2.weight", 0)
    for tensor, dim in [(w, 0), (w, 1), ("layer.self_attn.out_proj.weight", 1), ("layer.self_attn.in_proj_bias", 0)]:
        assert_breaks(model, spec, (x,), tensor, dim)


class SeparateKV(nn.Module):
    """nn.MultiheadAttention with kdim / vdim (separate q, k, v weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(5, 4), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.attn(self.q(x), self.k(x), self.v(x))[0])


def test_multihead_attention_kdim_vdim() -> None:
    model = scaled(SeparateKV())
    x = randn(2, 3, 5)
    spec = check(model, (x,), 1.0, train=True)
    assert groups_of(spec, "attn.k_proj_weight", 1) == groups_of(spec, "k.weight", 0)
    assert groups_of(spec, "attn.v_proj_weight", 1) == groups_of(spec, "v.weight", 0)
    for tensor, dim in [("attn.k_proj_weight", 1), ("attn.q_proj_weight", 0), ("attn.out_proj.weight", 1)]:
        assert_breaks(model, spec, (x,), tensor, dim)


class NativeMHA(nn.Module):
    """nn.MultiheadAttention's fast path, called explicitly (export never takes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 8), nn.Linear(8, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h, a = self.fc1(x), self.attn
        y, _ = torch._native_multi_head_attention(
            h, h, h, 8, 2, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight, a.out_proj.bias, None, False
        )
        return self.fc2(y)


def test_native_multi_head_attention_concat_of_q_k_v() -> None:
    model = scaled(NativeMHA())
    x = randn(2, 3, 5)
    spec = check(model, (x,), 1.0)  # was 0.0: the op froze every axis it touches
    rows = groups_of(spec, "attn.in_proj_weight", 0)
    assert len(rows) == 6 and rows[:2] == rows[2:4] and rows[0] == rows[4] and rows[5] not in rows[:4]
    assert groups_of(spec, "attn.out_proj.weight", 1) == rows[4:]
    for tensor, dim in [("attn.in_proj_weight", 0), ("attn.in_proj_weight", 1), ("attn.out_proj.weight", 1)]:
        assert_breaks(model, spec, (x,), tensor, dim)


class GroupedQuery(nn.Module):
    """6 query heads over 2 key/value heads (enable_gqa) with a custom scale."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(5, 24), nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(18, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 6, 4).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 4).transpose(1, 2)
        v = self.v(x).view(b, t, 2, 3).transpose(1, 2)
        y = nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=0.7)
        return self.o(y.transpose(1, 2).reshape(b, t, 18))


def test_grouped_query_attention_kv_heads_move_with_their_query_groups() -> None:
    model = scaled(GroupedQuery())
    x = randn(2, 3, 5)
    # before, the heads froze; now q rows = [kv heads 2, group 3, head_dim 4], k rows = [2, 4]
    spec = check(model, (x,), 1.0)
    kv, group, head_dim = groups_of(spec, "q.weight", 0)
    assert groups_of(spec, "k.weight", 0) == [kv, head_dim] and groups_of(spec, "v.weight", 0)[0] == kv
    assert spec.groups[group].size == 3
    for tensor, dim in [("k.weight", 0), ("q.weight", 0), ("v.weight", 0)]:
        assert_breaks(model, spec, (x,), tensor, dim)


# ------------------------------------------------------------------ other contractions
class Contractions(nn.Module):
    """bilinear, cosine_similarity, pairwise_distance, baddbmm (broadcast bias,
    alpha, beta), bmm and addbmm over a stacked-experts axis, between Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.d, self.c = nn.Linear(5, 7), nn.Linear(5, 7), nn.Linear(5, 6)
        self.bl, self.o = nn.Bilinear(7, 6, 4), nn.Linear(4, 3)
        self.w1, self.b1, self.w2 = (nn.Parameter(torch.empty(s)) for s in ((3, 7, 4), (1, 1, 4), (3, 4, 2)))
        self.bb, self.p = nn.Parameter(torch.empty(7, 2)), nn.Parameter(torch.empty(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        h, g, c = torch.tanh(self.a(x)), torch.tanh(self.d(x)), torch.tanh(self.c(x))
        y = self.o(torch.tanh(self.bl(h, c)))
        s = nn.functional.cosine_similarity(h, g, dim=-1)[:, None] + nn.functional.pairwise_distance(h, g, keepdim=True)
        experts = torch.tanh(torch.baddbmm(self.b1, h.expand(3, -1, -1), self.w1, beta=2.0, alpha=0.5))
        mixed = torch.bmm(experts, self.w2).sum(0) + h @ torch.addbmm(self.bb, self.w1, self.w2, alpha=0.3)
        return y + s + mixed @ self.p


def test_bilinear_similarities_and_batched_products() -> None:
    model = randomize(Contractions())
    x = randn(6, 5)
    # every hidden axis is grouped (the experts axis too: experts are summed), coverage 1.0; before,
    # bilinear / cosine_similarity / pairwise_distance / addbmm had no rule and froze what they touch
    spec = check(model, (x,), 1.0)
    assert groups_of(spec, "d.weight", 0) == groups_of(spec, "a.weight", 0) == groups_of(spec, "bl.weight", 1)
    assert groups_of(spec, "w1", 0) == groups_of(spec, "w2", 0) and spec.groups[groups_of(spec, "w1", 0)[0]].size == 3
    assert groups_of(spec, "w1", 2) == groups_of(spec, "b1", 2) == groups_of(spec, "w2", 1)
    assert groups_of(spec, "bb", 1) == groups_of(spec, "w2", 2) == groups_of(spec, "p", 0)
    for tensor, dim in [("bl.weight", 2), ("d.weight", 0), ("w1", 0), ("w1", 2), ("bb", 0), ("p", 0)]:
        assert_breaks(model, spec, (x,), tensor, dim)


class LowLevel(nn.Module):
    """aten::_convolution, native_dropout and embedding_bag, called directly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(3, 6, 3), nn.Conv1d(6, 2, 3)
        self.bag, self.fc = nn.EmbeddingBag(10, 6, mode="mean"), nn.Linear(6, 2)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        w, b = self.conv1.weight, self.conv1.bias
        h = torch.ops.aten._convolution(x, w, b, [1], [0], [1], False, [0], 1, False, False, True, True)
        h = torch.native_dropout(torch.tanh(h) + self.bag(idx)[:, :, None], 0.0, False)[0]
        return self.conv2(h).sum(-1) + self.fc(self.bag(idx))


def test_convolution_native_dropout_embedding_bag() -> None:
    model = randomize(LowLevel())
    inputs = (randn(4, 3, 9), torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(0)))
    spec = check(model, inputs, 1.0)
    assert groups_of(spec, "bag.weight", 1) == groups_of(spec, "conv1.weight", 0) == groups_of(spec, "fc.weight", 1)
    for tensor, dim in [("bag.weight", 1), ("conv1.weight", 0), ("conv2.weight", 1)]:
        assert_breaks(model, spec, inputs, tensor, dim)
