"""Capture robustness: higher-order ops, forward that mutates state or inputs,
inputs that do not fit the model, errors that name the failing graph node, and
state_dict version metadata through apply_permutation.

Every model is float64 with random weights; a correct permutation must keep
the outputs, and a deliberately wrong one (one member of a group left
unpermuted) must move them.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.utils.prune
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils import _pytree as pytree

import maskalign as ma
from maskalign.matching import activation
from maskalign.spec.capture import REGIONS_META, CapturedGraph, _GraphRunner, _restoring, capture, flatten_wrappers


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 and eval mode with random (non-default) parameters."""
    generator = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64, generator=generator) * 0.5)
    return model


def snapshot(model: nn.Module, *inputs: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, [x.clone() for x in inputs]


def assert_unchanged(model: nn.Module, before: tuple[dict[str, Tensor], list[Tensor]], *inputs: Tensor) -> None:
    state, saved = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), f"build_spec changed {key}"
    for x, x0 in zip(inputs, saved):
        assert torch.equal(x, x0), "build_spec changed an input"


def outputs_of(model: nn.Module, x: Tensor) -> Tensor:
    """One forward of a fresh copy (stateful models start from the same state)."""
    with torch.no_grad():
        return copy.deepcopy(model)(x.clone())


def break_one_member(model: nn.Module, spec: ma.PermutationSpec) -> nn.Module:
    """A copy of ``model`` whose first group is permuted on its first member only."""
    group = next(iter(spec.groups.values()))
    tensor, dim = group.members[0]
    state = model.state_dict()
    swap = torch.arange(state[tensor].shape[dim])
    swap[0], swap[1] = 1, 0
    state[tensor] = state[tensor].index_select(dim, swap)
    broken = copy.deepcopy(model)
    broken.load_state_dict(state)
    return broken


def assert_keeps_function_and_wrong_one_breaks_it(model: nn.Module, spec: ma.PermutationSpec, x: Tensor) -> None:
    assert spec.groups, "expected at least one permutable group"
    expected = outputs_of(model, x)
    generator = torch.Generator().manual_seed(7)
    perm = ma.random_permutation(spec, generator)
    assert not perm.is_identity()
    permuted = ma.apply_permutation(model, perm)
    assert (outputs_of(permuted, x) - expected).abs().max() <= 1e-10 * expected.abs().max()
    assert (outputs_of(break_one_member(model, spec), x) - expected).abs().max() > 1e-6 * expected.abs().max()


# ------------------------------------------------------- higher-order ops
class CondNet(nn.Module):
    """A permutable MLP stem, then a data-dependent ``torch.cond`` and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = torch.cond(h.sum() > 0, lambda t: torch.relu(t), lambda t: torch.tanh(t), (h,))
        return self.head(h)


class AutocastNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.relu(self.a(x))
        return self.b(h.to(x.dtype))


class GradRegionsNet(nn.Module):
    """``enable_grad`` / ``no_grad`` / ``set_grad_enabled(False)`` regions in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            h = torch.relu(self.a(x))
        with torch.no_grad():
            h = torch.tanh(self.b(h))
        with torch.set_grad_enabled(False):
            h = h * 2.0
        return self.c(h)


class CheckpointNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.relu(self.a(t)), x, use_reentrant=False)
        return self.b(h)


@pytest.mark.slow
def test_torch_cond_builds_and_propagates_through_both_branches() -> None:
    model, x = randomized(CondNet()), randn(5, 8)
    before = snapshot(model, x)
    spec = ma.build_spec(model, x)
    assert_unchanged(model, before, x)
    assert {m for g in spec.groups.values() for m in g.members} >= {
        ("stem.0.weight", 0),
        ("stem.0.bias", 0),
        ("stem.2.weight", 1),
        ("stem.2.weight", 0),
        ("head.weight", 1),
    }  # both branches are elementwise: the cond operand's units pass through
    assert spec.coverage == 1.0
    assert ma.check_equivalence(model, ma.random_permutation(spec), x)
    assert_keeps_function_and_wrong_one_breaks_it(model, spec, x)
    assert any(n.op == "get_attr" for n in spec.captured.flat_graph.nodes)  # type: ignore[union-attr]


@pytest.mark.parametrize("exported_with_grad", [False, True])
@pytest.mark.parametrize("net", [AutocastNet, GradRegionsNet, CheckpointNet])
def test_context_regions_build_run_and_inline(net: type[nn.Module], exported_with_grad: bool) -> None:
    model, x = randomized(net()), randn(5, 8)
    before = snapshot(model, x)
    if exported_with_grad:  # an ExportedProgram made with grad enabled keeps no_grad regions as wrappers
        spec = ma.build_spec(torch.export.export(model, (x,), strict=False), (x,))
    else:
        spec = ma.build_spec(model, x)
    assert_unchanged(model, before, x)
    assert ma.check_equivalence(model, ma.random_permutation(spec), x)
    captured = spec.captured
    assert captured is not None
    flat = captured.flat_graph
    hops = [n for n in flat.nodes if n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload)]
    assert all(n.target is operator.getitem for n in hops), hops  # no wrapper is left
    assert sum(n.target is torch.ops.aten.linear.default for n in flat.nodes) == len(
        [m for m in model.modules() if isinstance(m, nn.Linear)]
    )
    wrapped = any(n.op == "get_attr" for n in captured.graph.nodes)
    assert (flat is not captured.graph) == wrapped
    assert wrapped == any(REGIONS_META in n.meta for n in flat.nodes)
    graph_names = {n.name for n in captured.graph.nodes}
    kept = [n.name for n in flat.nodes if REGIONS_META not in n.meta]
    assert all(name in graph_names for name in kept)  # nodes outside regions keep their names
    assert len({n.name for n in flat.nodes}) == len(flat.nodes)


@pytest.mark.parametrize("net", [AutocastNet, GradRegionsNet])
def test_context_regions_do_not_freeze_their_axes(net: type[nn.Module]) -> None:
    model, x = randomized(net()), randn(5, 8)
    spec = ma.build_spec(model, x)
    assert ("a.weight", 0) in {m for g in spec.groups.values() for m in g.members}
    assert_keeps_function_and_wrong_one_breaks_it(model, spec, x)


def test_checkpoint_region_keeps_its_groups() -> None:
    model, x = randomized(CheckpointNet()), randn(5, 8)
    spec = ma.build_spec(model, x)
    assert ("a.weight", 0) in {m for g in spec.groups.values() for m in g.members}
    assert ma.check_equivalence(model, ma.random_permutation(spec), x)
    assert_keeps_function_and_wrong_one_breaks_it(model, spec, x)


def test_flatten_inlines_an_activation_checkpoint_wrapper() -> None:
    # torch.export inlines checkpointing itself; a graph that keeps the wrapper
    # (as dynamo makes it) is inlined by flatten_wrappers
    body_graph = torch.fx.Graph()
    t, w = body_graph.placeholder("t"), body_graph.placeholder("w")
    body_graph.output(
        (
            body_graph.call_function(
                torch.ops.aten.relu.default, (body_graph.call_function(torch.ops.aten.mm.default, (t, w)),)
            ),
        )
    )
    owner = nn.Module()
    owner.body = torch.fx.GraphModule(nn.Module(), body_graph)
    graph = torch.fx.Graph()
    x, weight = graph.placeholder("x"), graph.placeholder("weight")
    call = graph.call_function(
        torch.ops.higher_order.tag_activation_checkpoint, (graph.get_attr("body"), x, weight), {"use_reentrant": False}
    )
    graph.output((graph.call_function(operator.getitem, (call, 0)),))
    flat = flatten_wrappers(graph, owner)
    assert [n.target for n in flat.nodes if n.op == "call_function"] == [
        torch.ops.aten.mm.default,
        torch.ops.aten.relu.default,
    ]
    assert [n.name for n in flat.nodes if n.op == "call_function"][
        -1
    ] == "getitem"  # the output keeps the getitem's name
    a, b = randn(3, 4), randn(4, 5, seed=1)
    (got,) = _GraphRunner(owner, flat).run(a, b, enable_io_processing=False)
    torch.testing.assert_close(got, torch.relu(a @ b), rtol=0, atol=0)


# ------------------------------------------------ forward with side effects
class CountingNet(nn.Module):
    """Counts its calls and keeps a running mean of its hidden units in buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))
        self.register_buffer("running", torch.zeros(16, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        h = torch.relu(self.a(x))
        self.running.mul_(0.5).add_(h.mean(0))
        return self.b(h + self.running) * self.calls


class InputWriter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x.add_(1.0)
        return self.b(self.a(x).relu_())


class HiddenWriter(nn.Module):
    """Writes into a buffer only outside export: the graph cannot reproduce it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_exporting():
            self.calls += 1
        return self.a(x) * (self.calls + 1)


def test_forward_that_mutates_buffers_is_accepted_and_left_unchanged() -> None:
    model, x = randomized(CountingNet()), randn(5, 8)
    with torch.no_grad():
        model.running.copy_(randn(16, seed=3))
    before = snapshot(model, x)
    spec = ma.build_spec(model, x)
    assert_unchanged(model, before, x)
    group = next(g for g in spec.groups.values() if ("a.weight", 0) in g.members)
    assert ("running", 0) in group.members  # the running mean follows the hidden units
    assert_keeps_function_and_wrong_one_breaks_it(model, spec, x)


def test_forward_that_writes_into_its_input_is_accepted_and_input_left_unchanged() -> None:
    model, x = randomized(InputWriter()), randn(5, 8)
    before = snapshot(model, x)
    spec = ma.build_spec(model, x)
    assert_unchanged(model, before, x)
    assert spec.captured is not None and spec.captured.written == {"x"}
    assert_keeps_function_and_wrong_one_breaks_it(model, spec, x)


def test_mutation_the_graph_does_not_record_is_refused_naming_the_buffer() -> None:
    model, x = randomized(HiddenWriter()), randn(5, 8)
    before = snapshot(model, x)
    with pytest.raises(ma.TraceError, match=r"^Buffer 'calls' of HiddenWriter is mutated by forward") as info:
        ma.build_spec(model, x)
    assert "control flow" not in str(info.value)
    assert_unchanged(model, before, x)


@pytest.mark.slow
def test_functionalized_program_with_mutation_outputs_is_accepted() -> None:
    # run_decompositions functionalizes: mutations become BUFFER_MUTATION /
    # USER_INPUT_MUTATION outputs instead of in-place ops
    for net in (CountingNet, InputWriter):
        model, x = randomized(net()), randn(5, 8)
        x0 = x.clone()
        program = torch.export.export(model, (x.clone(),), strict=False).run_decompositions({})
        kinds = {s.kind.name for s in program.graph_signature.output_specs}
        assert kinds & {"BUFFER_MUTATION", "USER_INPUT_MUTATION"}
        state = {k: v.clone() for k, v in program.state_dict.items()}
        spec = ma.build_spec(program, (x,))
        assert torch.equal(x, x0)
        assert all(torch.equal(program.state_dict[k], v) for k, v in state.items())
        assert spec.groups


# --------------------------------------------------- inputs that do not fit
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def test_inputs_of_the_wrong_shape_say_so_quietly(capfd: pytest.CaptureFixture[str], caplog: Any) -> None:
    model = randomized(Net())
    with caplog.at_level(logging.DEBUG), pytest.raises(ma.TraceError) as info:
        ma.build_spec(model, randn(4, 10))
    message = str(info.value)
    assert message.startswith("example_inputs of shapes [(4, 10)] do not fit Net")
    assert "module 'body.0' (Linear)" in message and "aten.mm" in message
    assert "control flow" not in message and "What to do" in message
    out, err = capfd.readouterr()
    assert "failed while attempting to run meta" not in out + err
    assert not [r for r in caplog.records if r.name.startswith("torch")]


def test_data_dependent_branch_still_gets_control_flow_advice(capfd: pytest.CaptureFixture[str]) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            return h if h.mean() > 0 else -h

    with pytest.raises(ma.TraceError, match="torch.cond") as info:
        ma.build_spec(Branchy().double(), randn(2, 4))
    assert "h.mean() > 0" in str(info.value)
    out, err = capfd.readouterr()
    assert "def forward" not in out + err and "Unable to find user code" not in out + err


def test_logging_and_print_are_left_alone_after_a_successful_capture(capfd: pytest.CaptureFixture[str]) -> None:
    class Chatty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            print("hello from forward")
            return self.fc(x)

    handlers = {id(h): list(h.filters) for h in logging.getLogger("torch._subclasses.fake_tensor").handlers}
    ma.build_spec(Chatty().double(), randn(2, 4))
    assert "hello from forward" in capfd.readouterr().out
    assert {id(h): list(h.filters) for h in logging.getLogger("torch._subclasses.fake_tensor").handlers} == handlers


# ---------------------------------------------- errors name the graph node
def test_a_failing_node_is_named_with_its_module() -> None:
    model, x = randomized(Net()), randn(3, 64)
    spec = ma.build_spec(model, x)
    captured = spec.captured
    assert captured is not None
    state = dict(model.state_dict())
    state["head.weight"] = randn(4, 31)
    with pytest.raises(ma.TraceError, match=r"^Graph node 'linear_1' \(aten.linear.default in module 'head', Linear\)"):
        captured.run(state, [x])
    with pytest.raises(ma.TraceError, match=r"^Graph node 'linear_1'"):
        captured.run_pair(model.state_dict(), state, [x], {"linear_1"}, lambda *_: None)


def test_run_pair_visits_points_inside_inlined_regions() -> None:
    model, x = randomized(GradRegionsNet()), randn(5, 8)
    other = randomized(GradRegionsNet(), seed=1)
    captured = capture(model, x)
    inner = [n.name for n in captured.flat_graph.nodes if REGIONS_META in n.meta]
    assert inner
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    captured.run_pair(model.state_dict(), other.state_dict(), [x], set(inner), lambda n, a, b: seen.update({n: (a, b)}))
    assert set(seen) == set(inner)
    first = next(n for n in captured.flat_graph.nodes if n.target is torch.ops.aten.linear.default)
    a, b = seen[first.name]
    with torch.no_grad():
        torch.testing.assert_close(a, model.a(x), rtol=0, atol=0)
        torch.testing.assert_close(b, other.a(x), rtol=0, atol=0)


# ----------------------------------------------- state_dict version metadata
class Versioned(nn.Module):
    """Loads only state_dicts that carry its version (like torchvision's MNASNet)."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: dict[str, Any], *args: Any) -> None:
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_permuted_state_dict_keeps_version_metadata() -> None:
    model, x = randomized(nn.Sequential(Versioned(), nn.ReLU(), nn.Linear(4, 3))), randn(5, 8)
    spec = ma.build_spec(model, x)
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(0))
    assert ma.check_equivalence(model, perm, x)  # apply_permutation raised ValueError without the metadata
    permuted_state = ma.permute_state_dict(model.state_dict(), perm)
    assert permuted_state._metadata == model.state_dict()._metadata  # type: ignore[attr-defined]
    assert_keeps_function_and_wrong_one_breaks_it(model, spec, x)


@torch.library.custom_op("maskalign_test::float32_only", mutates_args=())
def _float32_only(x: Tensor) -> Tensor:
    if x.dtype != torch.float32:
        raise RuntimeError(f"Expected a Float32 matrix, got {x.dtype}")
    return x.clone()


@_float32_only.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def test_eager_failure_after_a_successful_trace_is_a_trace_error() -> None:
    """A kernel without a float64 version (transformers' grouped_mm experts)
    traces on fake tensors, then fails eagerly: a TraceError naming the model."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return _float32_only(self.fc(x))

    model = Net().double()
    with pytest.raises(ma.TraceError, match=r"^Net raises RuntimeError when run eagerly on example_inputs"):
        ma.build_spec(model, torch.randn(2, 4, dtype=torch.float64))


class CachedBias(nn.Module):
    """transformers' LeViT pattern: in eval mode forward caches a tensor
    derived from a parameter in a plain dict attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.bias = nn.Parameter(torch.randn(6))
        self.cache: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            bias = self.bias * 2
        else:
            if "b" not in self.cache:
                self.cache["b"] = self.bias * 2
            bias = self.cache["b"]
        return self.fc2(torch.relu(self.fc1(x) + bias))


@pytest.mark.slow
def test_build_spec_leaves_forward_caches_as_they_were() -> None:
    model = CachedBias().double().eval()
    ma.build_spec(model, torch.randn(2, 4, dtype=torch.float64))
    assert model.cache == {}


def test_a_cache_filled_after_the_spec_is_refused_not_permuted_stale() -> None:
    model = CachedBias().double().eval()
    x = torch.randn(2, 4, dtype=torch.float64)
    spec = ma.build_spec(model, x)
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)  # fills the cache
    with pytest.raises(ma.SpecError, match=r"^Tensor attribute cache\['b'\] of the model appeared after its spec"):
        ma.apply_permutation(model, perm)
    # negative control: permuting with the stale cache copied is a wrong answer
    stale = copy.deepcopy(model)
    stale.load_state_dict(ma.permute_state_dict(model.state_dict(), perm))
    with torch.no_grad():
        assert (stale(x) - expected).abs().max() > 1e-3
        model.cache.clear()
        assert torch.allclose(ma.apply_permutation(model, perm)(x), expected, rtol=1e-10, atol=1e-12)


def test_pruned_model_is_left_as_it_was_and_still_permutes() -> None:
    """torch.nn.utils.prune keeps ``weight = weight_orig * weight_mask`` as a
    plain attribute with autograd history: build_spec puts the very tensor back,
    and apply_permutation copies the model although deepcopy refuses such tensors."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    weight = model[0].weight
    x = torch.randn(3, 4, dtype=torch.float64)
    spec = ma.build_spec(model, x)
    assert model[0].weight is weight and weight.grad_fn is not None
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(0))
    permuted = ma.apply_permutation(model, perm)
    with torch.no_grad():
        assert torch.allclose(permuted(x), model(x), rtol=1e-12, atol=1e-12)
        wrong = ma.apply_permutation(model, perm)
        wrong[2].weight.copy_(wrong[2].weight.roll(1, 1))
        assert (wrong(x) - model(x)).abs().max() > 1e-3


class _Tagger(nn.Module):
    """Keyword inputs, as a tokenizer's batch feeds a transformers model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.hidden = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = torch.relu(self.hidden(self.embed(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.out(h).sum(1)


def _tagger_batch(n: int, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 11, (n, 5), generator=g), "attention_mask": torch.ones(n, 5)}


def test_a_dict_batch_is_taken_as_keyword_inputs() -> None:
    """``build_spec(model, batch)`` with a dict that fits forward's parameters
    means ``model(**batch)``; ``build_spec(model, kwargs=batch)`` the same
    without positional inputs. Both give the spec of the explicit call."""
    model = _Tagger().double().eval()
    batch = _tagger_batch(4)
    explicit = ma.build_spec(model, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]})
    for spec in (ma.build_spec(model, batch), ma.build_spec(model, kwargs=batch)):
        assert spec.groups.keys() == explicit.groups.keys() and len(spec.groups) == 2
        assert spec.coverage == explicit.coverage == 1.0
        perm = ma.random_permutation(spec, torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(**batch)
            assert torch.allclose(ma.apply_permutation(model, perm)(**batch), expected, rtol=1e-12, atol=1e-12)
            wrong = ma.apply_permutation(model, perm)
            wrong.out.weight.copy_(wrong.out.weight.roll(1, 1))  # negative control
            assert (wrong(**batch) - expected).abs().max() > 1e-3
    with pytest.raises(ma.TraceError, match=r"^Argument 'example_inputs' is missing"):
        ma.build_spec(model)


def test_dynamic_batch_covers_keyword_inputs() -> None:
    """``capture(..., dynamic_batch=True)`` marks dim 0 of keyword tensor
    inputs dynamic too (it was ignored when there were keywords): the graph
    then runs a batch of another size."""
    model = _Tagger().double().eval()
    captured = capture(model, None, _tagger_batch(2), check=False, dynamic_batch=True)
    shapes = [n.meta["val"].shape for n in captured.graph.nodes if n.op == "placeholder"]
    inputs = [s for n, s in zip(captured.graph.nodes, shapes) if captured.roles[n.name].kind == "input"]
    assert len(inputs) == 2 and all(not isinstance(s[0], int) for s in inputs)
    static = capture(model, None, _tagger_batch(2), check=False)
    assert all(isinstance(n.meta["val"].shape[0], int) for n in static.graph.nodes if n.op == "placeholder")


def test_a_parameter_set_to_none_by_forward_is_put_back_and_refused() -> None:
    model, x = randomized(Net()), randn(3, 64)
    captured = capture(model, x)
    weight = model.head.weight
    with pytest.raises(ma.TraceError, match=r"^Parameter 'head.weight' of Net is set to None or deleted by forward"):
        with _restoring(model, captured):
            model.head.weight = None
    assert model.head.weight is weight


# ------------------------------------- activation probes of other batch sizes
class _Probed(nn.Module):
    """fc1 -> ReLU -> fc2, with the ReLU applied only when ``keep(x)``."""

    def __init__(self, keep: Callable[[Tensor], bool] = lambda x: True) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        return self.fc2(torch.relu(h) if self.keep(x) else h)


def _concrete_batch(x: Tensor) -> bool:
    """Like a forward that sizes something on the Python side by the batch:
    a symbolic batch size (``Dim.AUTO``) is refused."""
    if not isinstance(x.shape[0], int):
        raise TypeError(f"batch size {x.shape[0]} is not an int")
    return True


class _CaptureSpy:
    """Stands in for ``capture`` in the activation matcher; records
    ``(dynamic_batch, batch size, outcome)`` of every call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[bool, int, str]] = []
        self.capture = activation.capture
        monkeypatch.setattr(activation, "capture", self)

    def __call__(self, model: nn.Module, args: Any, kwargs: Any, **options: Any) -> Any:
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
        try:
            captured = self.capture(model, args, kwargs, **options)
        except ma.TraceError:
            self.calls.append((options.get("dynamic_batch", False), leaves[0].shape[0], "TraceError"))
            raise
        self.calls.append((options.get("dynamic_batch", False), leaves[0].shape[0], "captured"))
        return captured


def test_a_failed_dynamic_capture_leaves_the_inputs_unmarked() -> None:
    """torch.export marks Dim.AUTO dims on the input tensors themselves and
    removes the marks only when it succeeds; capture removes them either way,
    so that a static capture of the same tensors afterwards is static."""
    model, x = randomized(_Probed(_concrete_batch)), randn(3, 5)
    with pytest.raises(ma.TraceError, match=r"TypeError: batch size s\d+ is not an int"):
        capture(model, x, check=False, dynamic_batch=True)
    assert not [name for name in vars(x) if name.startswith("_dynamo")]
    static = capture(model, x)
    assert all(isinstance(n.meta["val"].shape[0], int) for n in static.graph.nodes if n.op == "placeholder")


def _self_match(model: nn.Module, data: list[Any], **kw: Any) -> tuple[ma.PermutationSpec, bool]:
    """Spec of ``model`` on the first batch; whether matching ``model`` to a
    permuted copy of itself over ``data`` recovers the permutation."""
    first = data[0]
    spec = ma.build_spec(model, **({"kwargs": first} if isinstance(first, dict) else {"example_inputs": first}))
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(3))
    permuted = ma.apply_permutation(model, sigma)
    return spec, ma.match_activations(model, permuted, data, spec, progress=False, **kw) == sigma


def test_other_batch_sizes_fall_back_to_static_capture_when_dynamic_export_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = randomized(_Probed(_concrete_batch))
    spy = _CaptureSpy(monkeypatch)
    spec, recovered = _self_match(model, [randn(4, 5), randn(3, 5, seed=1), randn(6, 5, seed=2)])
    # batch 4 is the spec's own graph; batch 3 tries a dynamic batch dimension once, which fails,
    # then captures statically; batch 6 goes straight to a static capture
    assert spy.calls == [(True, 3, "TraceError"), (False, 3, "captured"), (False, 6, "captured")]
    assert spec.cache["dynamic"] is False
    assert recovered


def test_a_dynamic_graph_without_the_probed_nodes_falls_back_to_static_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the ReLU (the probed point under points="post") is skipped on a symbolic batch size
    model = randomized(_Probed(lambda x: isinstance(x.shape[0], int)))
    spy = _CaptureSpy(monkeypatch)
    spec, recovered = _self_match(model, [randn(4, 5), randn(3, 5, seed=1)], points="post")
    # the dynamic capture works but lacks 'relu': the batch is captured once more, statically
    assert spy.calls == [(True, 3, "captured"), (False, 3, "captured")]
    assert spec.cache["dynamic"] is False
    assert recovered


def test_a_dynamic_batch_that_works_is_kept_for_every_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    model = randomized(_Probed())
    spy = _CaptureSpy(monkeypatch)
    spec, recovered = _self_match(model, [randn(4, 5), randn(3, 5, seed=1), randn(6, 5, seed=2)], points="post")
    assert spy.calls == [(True, 3, "captured")]
    assert isinstance(spec.cache["dynamic"], CapturedGraph)
    assert recovered


def test_keyword_inputs_of_other_batch_sizes_are_captured_statically(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _Tagger().double().eval()
    spy = _CaptureSpy(monkeypatch)
    _, recovered = _self_match(model, [_tagger_batch(4), _tagger_batch(3, seed=1), _tagger_batch(3, seed=2)])
    assert spy.calls == [(False, 3, "captured")]  # one static graph per shape, cached
    assert recovered


def test_inputs_that_trace_to_a_different_graph_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # a batch of 2 or fewer skips the ReLU that the spec (batch 4) probes under points="post"
    model = randomized(_Probed(lambda x: x.shape[0] > 2))
    spy = _CaptureSpy(monkeypatch)
    with pytest.raises(
        ma.TraceError,
        match=r"^Inputs of shapes \(\(2, 5\),\) trace to a different graph \(nodes \['relu'\] are missing\); "
        r"use batches of one shape",
    ):
        _self_match(model, [randn(4, 5), randn(2, 5, seed=1)], points="post")
    assert spy.calls == [(True, 2, "captured"), (False, 2, "captured")]


def test_data_dependent_shapes_raise_a_trace_error_naming_the_node() -> None:
    """``nonzero`` gives a tensor whose size depends on the data: the analysis
    cannot size its axes, so build_spec raises a TraceError naming the node
    (not torch's GuardOnDataDependentSymNode from deep in a rule)."""

    class Selects(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu(self.a(x))
            rows = h[:, 0].nonzero().squeeze(1)
            return self.b(h[rows])

    with pytest.raises(
        ma.TraceError, match=r"^Node '.*' \(aten::.*\) has a tensor size that depends on the data"
    ) as info:
        ma.build_spec(Selects(), torch.randn(6, 4))
    assert "nonzero" in str(info.value) and info.value.__cause__ is not None
