"""Misuse battery for the permutation and spec APIs.

Every case makes one ordinary mistake and asserts that maskalign answers with
a typed error (a :class:`MaskAlignError` subclass of the expected type) whose
message names the culprit (the key, layer, shape or argument) and ends with
the documentation link, and that nothing it was given changed: model state,
parameter objects, ``requires_grad`` and training flags, masks, permutations,
files and folders (:func:`unchanged`). Negative controls show that the helper
detects a mutation and that correct use of the same objects passes.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import CrossTied, randomize
from torch import Tensor, nn

import maskalign as ma
from maskalign.errors import (
    DOCS_URL,
    ArgumentTypeError,
    MaskAlignError,
    MaskError,
    SpecError,
    SpecMismatchError,
    TraceError,
)
from maskalign.permutation import FORMAT, check_same_architecture


# ------------------------------------------------------------------ models
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class ResidualBlock(Block):
    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class Net(nn.Module):
    def __init__(self, block: type[Block] = Block, width: int = 16, depth: int = 2, flag: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.norm = nn.BatchNorm1d(width)
        self.blocks = nn.ModuleList(block(width) for _ in range(depth))
        self.out = nn.Linear(width, 3)
        self.flag = flag

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.inp(x))
        for block in self.blocks:
            x = x + block(x) if self.flag else block(x)
        return self.out(F.relu(x))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ------------------------------------------------------ nothing mutated
def _freeze(thing: Any) -> Any:
    """A comparable deep snapshot of a model, mapping, tensor, permutation or path."""
    if isinstance(thing, nn.Module):
        return {
            "state": {k: v.detach().clone() for k, v in thing.state_dict().items()},
            "objects": [
                (n, id(p), p.requires_grad, p.dtype) for n, p in thing.named_parameters(remove_duplicate=False)
            ],
            "buffers": [(n, id(b)) for n, b in thing.named_buffers(remove_duplicate=False)],
            "training": [(n, m.training) for n, m in thing.named_modules()],
            "storages": [
                (n, p.untyped_storage().data_ptr(), p.storage_offset(), p.stride())
                for n, p in thing.named_parameters(remove_duplicate=False)
            ],
        }
    if isinstance(thing, ma.Permutation):
        return {"spec": id(thing.spec), "fingerprint": thing.fingerprint, "indices": _freeze(dict(thing))}
    if isinstance(thing, Tensor):
        return ("tensor", thing.detach().clone(), thing.dtype, thing.layout, thing.requires_grad)
    if isinstance(thing, Path):
        if thing.is_dir():
            return ("dir", sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in thing.iterdir()))
        if thing.exists():
            return ("file", thing.read_bytes(), thing.stat().st_mtime_ns)
        return ("absent",)
    if isinstance(thing, dict):
        return ("dict", type(thing), [(k, _freeze(v)) for k, v in thing.items()])
    if isinstance(thing, (list, tuple)):
        return (type(thing), [_freeze(v) for v in thing])
    return ("value", copy.deepcopy(thing))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.layout == b.layout
            and (a.layout != torch.strided or bool(torch.equal(a, b)))
            and (a.layout == torch.strided or bool(torch.equal(a.to_dense(), b.to_dense())))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@contextlib.contextmanager
def unchanged(*things: Any) -> Iterator[None]:
    """Assert that the block leaves every one of ``things`` as it found it."""
    before = [_freeze(t) for t in things]
    yield
    for i, (thing, snap) in enumerate(zip(things, before)):
        assert _same(_freeze(thing), snap), f"input {i} ({type(thing).__name__}) was mutated"


@contextlib.contextmanager
def misuse(error: type[MaskAlignError], *culprits: str, untouched: tuple[Any, ...] = ()) -> Iterator[None]:
    """The block raises ``error`` (a MaskAlignError), naming every culprit,
    with the docs link, and mutates none of ``untouched``."""
    with unchanged(*untouched), pytest.raises(MaskAlignError) as info:
        yield
    err = info.value
    assert type(err) is error or isinstance(err, error), f"{type(err).__name__} is not a {error.__name__}"
    text = str(err)
    assert text.rstrip().endswith(f"{DOCS_URL}/{err.docs_page}"), text
    for culprit in culprits:
        assert culprit in text, f"{culprit!r} not in message: {text}"


# ------------------------------------------------------------------ world
@dataclass
class World:
    model: nn.Module
    spec: ma.PermutationSpec
    perm: ma.Permutation
    residual: nn.Module
    flagged: nn.Module
    flag_spec: ma.PermutationSpec
    wide: nn.Module
    deep: nn.Module
    masks: dict[str, Tensor]
    group: str
    tmp: Path
    saved: Path


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> World:
    model = randomize(Net())
    spec = ma.build_spec(model, X)
    perm = ma.random_permutation(spec, torch.Generator().manual_seed(0))
    residual = randomize(Net(ResidualBlock))
    residual.load_state_dict(model.state_dict())
    flagged = randomize(Net(flag=True))
    flagged.load_state_dict(model.state_dict())
    masks = {
        name: torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) > 0.5
        for name, p in model.named_parameters()
    }
    tmp = tmp_path_factory.mktemp("misuse")
    saved = tmp / "perm.pt"
    perm.save(saved)
    group = next(g for g in spec.groups if spec.groups[g].size > 1)
    files = {
        "nofp.pt": {"format": FORMAT, "indices": dict(perm)},
        "lists.pt": {"format": FORMAT, "fingerprint": spec.fingerprint, "indices": [[0, 1]]},
        "floats.pt": {
            "format": FORMAT,
            "fingerprint": spec.fingerprint,
            "indices": {group: [i + 0.5 for i in range(spec.groups[group].size)]},
        },
        "bare.pt": dict(perm),
        "future.pt": {"format": "maskalign.Permutation/9", "fingerprint": "", "indices": {}},
    }
    for name, payload in files.items():
        torch.save(payload, tmp / name)
    (tmp / "notes.txt").write_text("not a torch file")
    return World(
        model=model,
        spec=spec,
        perm=perm,
        residual=residual,
        flagged=flagged,
        flag_spec=ma.build_spec(flagged, X),
        wide=randomize(Net(width=12)),
        deep=randomize(Net(depth=3)),
        masks=masks,
        group=group,
        tmp=tmp,
        saved=saved,
    )


def _n(w: World) -> int:
    return w.spec.groups[w.group].size


# Each case: (id, error type, culprits (callable of the world -> list of substrings),
# call (world -> None), untouched (world -> tuple of inputs)).
Case = tuple[
    str, type[MaskAlignError], Callable[[World], list[str]], Callable[[World], Any], Callable[[World], tuple[Any, ...]]
]

CASES: list[Case] = [
    # ---------------------------------------------------------- build_spec
    (
        "build_spec-none",
        ArgumentTypeError,
        lambda w: ["Argument 'model'", "None"],
        lambda w: ma.build_spec(None, X),
        lambda w: (X,),
    ),
    (
        "build_spec-state_dict",
        ArgumentTypeError,
        lambda w: ["Argument 'model'", "state_dict", "nn.Module"],
        lambda w: ma.build_spec(w.model.state_dict(), X),
        lambda w: (w.model, X),
    ),
    (
        "build_spec-no-inputs",
        TraceError,
        lambda w: ["example_inputs"],
        lambda w: ma.build_spec(w.model),
        lambda w: (w.model,),
    ),
    (
        "build_spec-too-many-inputs",
        TraceError,
        lambda w: ["Net.forward", "too many positional arguments"],
        lambda w: ma.build_spec(w.model, (X, X)),
        lambda w: (w.model, X),
    ),
    (
        "build_spec-wrong-feature-size",
        TraceError,
        lambda w: ["(4, 5)"],
        lambda w: ma.build_spec(w.model, torch.randn(4, 5, dtype=torch.float64)),
        lambda w: (w.model,),
    ),
    (
        "build_spec-buffers-a-string",
        ArgumentTypeError,
        lambda w: ["permutable_buffers", "'norm'"],
        lambda w: ma.build_spec(w.model, X, permutable_buffers="norm"),
        lambda w: (w.model, X),
    ),
    (
        "build_spec-unknown-buffer",
        SpecError,
        lambda w: ["permutable_buffers", "no_such_buffer"],
        lambda w: ma.build_spec(w.model, X, permutable_buffers=["no_such_buffer"]),
        lambda w: (w.model, X),
    ),
    (
        "build_spec-kwargs-a-list",
        ArgumentTypeError,
        lambda w: ["Argument 'kwargs'", "list"],
        lambda w: ma.build_spec(w.model, X, kwargs=[X]),
        lambda w: (w.model, X),
    ),
    # --------------------------------------------------------- Permutation
    (
        "Permutation-float-indices",
        SpecError,
        lambda w: [f"group '{w.group}'", "torch.float32", "3.9"],
        lambda w: ma.Permutation(w.spec, {w.group: torch.arange(_n(w), dtype=torch.float32) + 0.9}),
        lambda w: (w.model,),
    ),
    (
        "Permutation-duplicates",
        SpecError,
        lambda w: [f"group '{w.group}'", "hold 0 2 times"],
        lambda w: ma.Permutation(
            w.spec, {w.group: torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(_n(w) - 1)])}
        ),
        lambda w: (),
    ),
    (
        "Permutation-out-of-range",
        SpecError,
        lambda w: [f"group '{w.group}'", f"outside range({_n(w)})"],
        lambda w: ma.Permutation(w.spec, {w.group: torch.arange(1, _n(w) + 1)}),
        lambda w: (),
    ),
    (
        "Permutation-wrong-length",
        SpecError,
        lambda w: [f"group '{w.group}'", f"length {_n(w) - 1}"],
        lambda w: ma.Permutation(w.spec, {w.group: torch.arange(_n(w) - 1)}),
        lambda w: (),
    ),
    (
        "Permutation-2d",
        SpecError,
        lambda w: [f"group '{w.group}'", f"shape ({_n(w)}, 1)"],
        lambda w: ma.Permutation(w.spec, {w.group: torch.arange(_n(w)).reshape(-1, 1)}),
        lambda w: (),
    ),
    (
        "Permutation-bool",
        SpecError,
        lambda w: [f"group '{w.group}'", "torch.bool"],
        lambda w: ma.Permutation(w.spec, {w.group: torch.ones(_n(w), dtype=torch.bool)}),
        lambda w: (),
    ),
    (
        "Permutation-strings",
        SpecError,
        lambda w: [f"group '{w.group}'", "list"],
        lambda w: ma.Permutation(w.spec, {w.group: ["a"] * _n(w)}),
        lambda w: (),
    ),
    (
        "Permutation-group-typo",
        SpecError,
        lambda w: [f"Group '{w.group}x'", f"Did you mean: '{w.group}'"],
        lambda w: ma.Permutation(w.spec, {w.group + "x": torch.arange(_n(w))}),
        lambda w: (),
    ),
    (
        "Permutation-indices-a-list",
        ArgumentTypeError,
        lambda w: ["Argument 'indices'", "list"],
        lambda w: ma.Permutation(w.spec, [torch.arange(_n(w))]),
        lambda w: (),
    ),
    (
        "Permutation-spec-a-model",
        ArgumentTypeError,
        lambda w: ["Argument 'spec'", "a model (Net)", "build_spec"],
        lambda w: ma.Permutation(w.model, {}),
        lambda w: (w.model,),
    ),
    # ------------------------------------------------------------ load/save
    (
        "load-no-fingerprint",
        SpecError,
        lambda w: ["nofp.pt", "'fingerprint'", "perm.save(path)"],
        lambda w: ma.Permutation.load(w.tmp / "nofp.pt", w.spec),
        lambda w: (w.tmp / "nofp.pt",),
    ),
    (
        "load-indices-a-list",
        SpecError,
        lambda w: ["Entry 'indices'", "lists.pt", "a list"],
        lambda w: ma.Permutation.load(
            w.tmp / "lists.pt",
            w.spec,
        ),
        lambda w: (w.tmp / "lists.pt",),
    ),
    (
        "load-index-lists-of-floats",
        SpecError,
        lambda w: [f"group '{w.group}'", "floats.pt", "torch.float"],
        lambda w: ma.Permutation.load(
            w.tmp / "floats.pt",
            w.spec,
        ),
        lambda w: (w.tmp / "floats.pt",),
    ),
    (
        "load-directory",
        SpecError,
        lambda w: [str(w.tmp), "is a directory"],
        lambda w: ma.Permutation.load(w.tmp, w.spec),
        lambda w: (w.tmp,),
    ),
    (
        "load-bare-indices",
        SpecError,
        lambda w: ["bare.pt", "ma.Permutation(spec, torch.load(path))"],
        lambda w: ma.Permutation.load(w.tmp / "bare.pt", w.spec),
        lambda w: (w.tmp / "bare.pt",),
    ),
    (
        "load-text-file",
        SpecError,
        lambda w: ["notes.txt", "not a permutation saved by maskalign"],
        lambda w: ma.Permutation.load(w.tmp / "notes.txt", w.spec),
        lambda w: (w.tmp / "notes.txt",),
    ),
    (
        "load-other-spec",
        SpecMismatchError,
        lambda w: ["perm.pt", "fingerprint", "Axis 0 of 'blocks.0.fc2.weight'"],
        lambda w: ma.Permutation.load(w.saved, w.flag_spec),
        lambda w: (w.saved,),
    ),
    (
        "load-spec-a-model",
        ArgumentTypeError,
        lambda w: ["Argument 'spec' of Permutation.load", "a model (Net)"],
        lambda w: ma.Permutation.load(w.saved, w.model),
        lambda w: (w.saved, w.model),
    ),
    (
        "load-path-a-dict",
        ArgumentTypeError,
        lambda w: ["Argument 'path'", "ma.Permutation(spec, indices)"],
        lambda w: ma.Permutation.load(dict(w.perm), w.spec),
        lambda w: (w.perm,),
    ),
    (
        "load-unknown-format",
        SpecError,
        lambda w: ["future.pt", "'maskalign.Permutation/9'"],
        lambda w: ma.Permutation.load(w.tmp / "future.pt", w.spec),
        lambda w: (w.tmp / "future.pt",),
    ),
    (
        "save-to-directory",
        SpecError,
        lambda w: [str(w.tmp), "is a directory"],
        lambda w: w.perm.save(w.tmp),
        lambda w: (w.tmp, w.perm),
    ),
    # ------------------------------------------------------ apply_permutation
    (
        "apply-residual-model",
        SpecMismatchError,
        lambda w: ["Module 'blocks.0'", "ResidualBlock", "Block", "build_spec"],
        lambda w: ma.apply_permutation(w.residual, w.perm),
        lambda w: (w.residual, w.perm),
    ),
    (
        "apply-residual-model-inplace",
        SpecMismatchError,
        lambda w: ["Module 'blocks.0'", "ResidualBlock"],
        lambda w: ma.apply_permutation(w.residual, w.perm, inplace=True),
        lambda w: (w.residual, w.perm),
    ),
    (
        "apply-flag-wired-with-spec",
        SpecMismatchError,
        lambda w: ["Axis 0 of 'blocks.0.fc2.weight'", "wired differently"],
        lambda w: ma.apply_permutation(w.flagged, w.perm, spec=w.flag_spec),
        lambda w: (w.flagged, w.perm),
    ),
    (
        "apply-narrower-model",
        SpecMismatchError,
        lambda w: ["'inp.weight'", "(12, 8)", "(16, 8)"],
        lambda w: ma.apply_permutation(w.wide, w.perm),
        lambda w: (w.wide, w.perm),
    ),
    (
        "apply-extra-layer",
        SpecMismatchError,
        lambda w: ["'blocks.2.fc1.weight'", "(16, 16)"],
        lambda w: ma.apply_permutation(w.deep, w.perm, inplace=True),
        lambda w: (w.deep, w.perm),
    ),
    (
        "apply-swapped",
        ArgumentTypeError,
        lambda w: ["apply_permutation(model, perm)"],
        lambda w: ma.apply_permutation(w.perm, w.model),
        lambda w: (w.perm, w.model),
    ),
    (
        "apply-none",
        ArgumentTypeError,
        lambda w: ["Argument 'model'", "None"],
        lambda w: ma.apply_permutation(None, w.perm),
        lambda w: (w.perm,),
    ),
    (
        "apply-state-dict",
        ArgumentTypeError,
        lambda w: ["Argument 'model'", "OrderedDict", "permute_state_dict"],
        lambda w: ma.apply_permutation(w.model.state_dict(), w.perm),
        lambda w: (w.model, w.perm),
    ),
    (
        "apply-spec-not-perm",
        ArgumentTypeError,
        lambda w: ["Argument 'perm'", "PermutationSpec", "random_permutation"],
        lambda w: ma.apply_permutation(w.model, w.spec),
        lambda w: (w.model,),
    ),
    (
        "apply-dict-not-perm",
        ArgumentTypeError,
        lambda w: ["Argument 'perm'", "ma.Permutation(spec, indices)"],
        lambda w: ma.apply_permutation(w.model, dict(w.perm)),
        lambda w: (w.model, w.perm),
    ),
    (
        "apply-inplace-not-bool",
        ArgumentTypeError,
        lambda w: ["Argument 'inplace'", "'yes'"],
        lambda w: ma.apply_permutation(w.model, w.perm, inplace="yes"),
        lambda w: (w.model, w.perm),
    ),
    (
        "apply-spec-a-model",
        ArgumentTypeError,
        lambda w: ["Argument 'spec' of apply_permutation", "a model (Net)"],
        lambda w: ma.apply_permutation(w.model, w.perm, spec=w.model),
        lambda w: (w.model, w.perm),
    ),
    (
        "apply-half-model-other-width",
        SpecMismatchError,
        lambda w: ["'inp.weight'", "(12, 8)"],
        lambda w: ma.apply_permutation(copy.deepcopy(w.wide).half(), w.perm),
        lambda w: (w.wide, w.perm),
    ),
    # ----------------------------------------------------- permute_state_dict
    (
        "state-a-model",
        ArgumentTypeError,
        lambda w: ["Argument 'state'", "a model (Net)", "model.state_dict()"],
        lambda w: ma.permute_state_dict(w.model, w.perm),
        lambda w: (w.model, w.perm),
    ),
    (
        "state-swapped",
        ArgumentTypeError,
        lambda w: ["permute_state_dict(state, perm)"],
        lambda w: ma.permute_state_dict(w.perm, w.model.state_dict()),
        lambda w: (w.perm, w.model),
    ),
    (
        "state-whole-checkpoint",
        SpecMismatchError,
        lambda w: ["checkpoint['model']"],
        lambda w: ma.permute_state_dict({"model": w.model.state_dict(), "epoch": 3}, w.perm),
        lambda w: (w.model, w.perm),
    ),
    (
        "state-missing-key",
        SpecMismatchError,
        lambda w: ["'out.bias'"],
        lambda w: ma.permute_state_dict({k: v for k, v in w.model.state_dict().items() if k != "out.bias"}, w.perm),
        lambda w: (w.model, w.perm),
    ),
    (
        "state-value-not-tensor",
        ArgumentTypeError,
        lambda w: ["Entry 'out.bias'", "list"],
        lambda w: ma.permute_state_dict({**w.model.state_dict(), "out.bias": [0.0, 0.0, 0.0]}, w.perm),
        lambda w: (w.model, w.perm),
    ),
    # ------------------------------------------------------------ permute_mask
    (
        "mask-swapped",
        ArgumentTypeError,
        lambda w: ["Argument 'masks' is a Permutation; call permute_mask(masks, perm)."],
        lambda w: ma.permute_mask(w.perm, w.masks),
        lambda w: (w.perm, w.masks),
    ),
    (
        "mask-typo",
        MaskError,
        lambda w: ["Mask key 'blocks.0.fc1.wieght'", "Did you mean: 'blocks.0.fc1.weight'"],
        lambda w: ma.permute_mask({"blocks.0.fc1.wieght": w.masks["blocks.0.fc1.weight"]}, w.perm),
        lambda w: (w.masks, w.perm),
    ),
    (
        "mask-list-of-pairs",
        ArgumentTypeError,
        lambda w: ["Argument 'masks'", "a list of 14 items", "dict(pairs)"],
        lambda w: ma.permute_mask(list(w.masks.items()), w.perm),
        lambda w: (w.masks, w.perm),
    ),
    (
        "mask-none",
        ArgumentTypeError,
        lambda w: ["Argument 'masks'", "None"],
        lambda w: ma.permute_mask(None, w.perm),
        lambda w: (w.perm,),
    ),
    (
        "mask-a-model",
        ArgumentTypeError,
        lambda w: ["Argument 'masks'", "a Net", "a model was passed where the masks go"],
        lambda w: ma.permute_mask(w.model, w.perm),
        lambda w: (w.model, w.perm),
    ),
    (
        "mask-float",
        MaskError,
        lambda w: ["Mask for 'inp.weight'", "torch.float32", "mask.bool()"],
        lambda w: ma.permute_mask({"inp.weight": w.masks["inp.weight"].float()}, w.perm),
        lambda w: (w.masks, w.perm),
    ),
    (
        "mask-shape",
        MaskError,
        lambda w: ["Mask for 'inp.weight'", "(8, 16)", "(16, 8)"],
        lambda w: ma.permute_mask({"inp.weight": w.masks["inp.weight"].t()}, w.perm),
        lambda w: (w.masks, w.perm),
    ),
    (
        "mask-buffer-key",
        MaskError,
        lambda w: ["Mask key 'norm.running_mean'", "buffer"],
        lambda w: ma.permute_mask({"norm.running_mean": torch.ones(16, dtype=torch.bool)}, w.perm),
        lambda w: (w.perm,),
    ),
    (
        "mask-sparse",
        MaskError,
        lambda w: ["Mask for 'inp.weight'", "sparse_coo", "to_dense()"],
        lambda w: ma.permute_mask({"inp.weight": w.masks["inp.weight"].to_sparse()}, w.perm),
        lambda w: (w.masks, w.perm),
    ),
    (
        "mask-value-a-list",
        MaskError,
        lambda w: ["Mask for 'out.bias'", "list"],
        lambda w: ma.permute_mask({"out.bias": [True, False, True]}, w.perm),
        lambda w: (w.perm,),
    ),
    (
        "mask-perm-is-masks",
        ArgumentTypeError,
        lambda w: ["Argument 'perm' of permute_mask", "dict"],
        lambda w: ma.permute_mask(w.masks, w.masks),
        lambda w: (w.masks,),
    ),
    (
        "mask-other-wiring",
        SpecMismatchError,
        lambda w: ["wired differently"],
        lambda w: ma.permute_mask(w.masks, w.perm, spec=w.flag_spec),
        lambda w: (w.masks, w.perm),
    ),
    # ------------------------------------------------------ random_permutation
    (
        "random-int-generator",
        ArgumentTypeError,
        lambda w: ["Argument 'generator'", "torch.Generator().manual_seed(7)"],
        lambda w: ma.random_permutation(w.spec, 7),
        lambda w: (),
    ),
    (
        "random-spec-a-model",
        ArgumentTypeError,
        lambda w: ["Argument 'spec' of random_permutation", "a model (Net)", "build_spec"],
        lambda w: ma.random_permutation(w.model),
        lambda w: (w.model,),
    ),
    (
        "random-spec-none",
        ArgumentTypeError,
        lambda w: ["Argument 'spec' of random_permutation", "None"],
        lambda w: ma.random_permutation(None),
        lambda w: (),
    ),
    # --------------------------------------------------------- compose/inverse
    (
        "compose-other-spec",
        SpecMismatchError,
        lambda w: ["Permutation 'then'", "Axis 0 of 'blocks.0.fc2.weight'"],
        lambda w: w.perm.compose(ma.random_permutation(w.flag_spec)),
        lambda w: (w.perm,),
    ),
    (
        "compose-inverse-other-spec",
        SpecMismatchError,
        lambda w: ["Permutation 'then'", "fingerprint"],
        lambda w: w.perm.inverse().compose(ma.random_permutation(w.flag_spec).inverse()),
        lambda w: (w.perm,),
    ),
    (
        "compose-a-dict",
        ArgumentTypeError,
        lambda w: ["Argument 'then'", "ma.Permutation(spec, indices)"],
        lambda w: w.perm.compose(dict(w.perm)),
        lambda w: (w.perm,),
    ),
    # ------------------------------------------------- check_same_architecture
    (
        "check-residual-model",
        SpecMismatchError,
        lambda w: ["Module 'blocks.0' of model_b", "ResidualBlock"],
        lambda w: check_same_architecture(w.residual, w.spec, "model_b"),
        lambda w: (w.residual,),
    ),
    (
        "check-narrower-state",
        SpecMismatchError,
        lambda w: ["model_b", "'inp.weight'", "(12, 8)"],
        lambda w: check_same_architecture(w.wide.state_dict(), w.spec, "model_b"),
        lambda w: (w.wide,),
    ),
    (
        "check-state-none",
        ArgumentTypeError,
        lambda w: ["Argument 'state'", "None"],
        lambda w: check_same_architecture(None, w.spec),
        lambda w: (),
    ),
    (
        "check-spec-a-permutation",
        ArgumentTypeError,
        lambda w: ["Argument 'spec'", "spec=perm.spec"],
        lambda w: check_same_architecture(w.model, w.perm),
        lambda w: (w.model, w.perm),
    ),
    # ------------------------------------------------------------ permute_tensor
    (
        "tensor-typo",
        SpecError,
        lambda w: ["Tensor 'out.wieght'", "Did you mean: 'out.weight'"],
        lambda w: w.perm.permute_tensor("out.wieght", w.model.out.weight),
        lambda w: (w.model, w.perm),
    ),
    (
        "tensor-shape",
        SpecMismatchError,
        lambda w: ["'out.weight'", "(16, 3)", "(3, 16)"],
        lambda w: w.perm.permute_tensor("out.weight", w.model.out.weight.t()),
        lambda w: (w.model, w.perm),
    ),
    (
        "tensor-not-a-tensor",
        ArgumentTypeError,
        lambda w: ["'out.weight'", "a list"],
        lambda w: w.perm.permute_tensor("out.weight", [[0.0]]),
        lambda w: (w.perm,),
    ),
]


@pytest.mark.parametrize(
    ("error", "culprits", "call", "untouched"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_misuse(w: World, error: type[MaskAlignError], culprits: Callable, call: Callable, untouched: Callable) -> None:
    with misuse(error, *culprits(w), untouched=untouched(w)):
        call(w)


def test_the_battery_is_large_and_ids_are_unique() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


# ------------------------------------------------------ storage misuse (own models)
def test_misuse_inplace_with_a_data_alias(w: World) -> None:
    target = copy.deepcopy(w.model)
    alias = target.blocks[1].fc2.weight.data
    with misuse(SpecError, "'blocks.1.fc2.weight'", "inplace=True", untouched=(target, alias, w.perm)):
        ma.apply_permutation(target, w.perm, inplace=True)


def test_misuse_shared_storage_the_permutation_cannot_keep() -> None:
    model = CrossTied().eval()
    spec = ma.build_spec(model, torch.randn(3, 4, dtype=torch.float64))
    perm = ma.Permutation(spec, {"a.weight:0": torch.tensor([1, 0, 2, 3])})
    with misuse(SpecError, "'a.weight'", "'b.weight'", untouched=(model, perm)):
        ma.apply_permutation(model, perm)


def test_misuse_frozen_flags_and_train_mode_are_kept(w: World) -> None:
    """Train flags and requires_grad are part of what must not change."""
    model = copy.deepcopy(w.residual).train()
    model.blocks[0].eval()
    model.inp.weight.requires_grad_(False)
    with misuse(SpecMismatchError, "Module 'blocks.0'", untouched=(model,)):
        ma.apply_permutation(model, w.perm, inplace=True)
    assert model.training and not model.blocks[0].training and not model.inp.weight.requires_grad


# ---------------------------------------------------------- negative controls
def test_unchanged_detects_mutations(w: World) -> None:
    model = copy.deepcopy(w.model)
    with pytest.raises(AssertionError, match="mutated"), unchanged(model):
        with torch.no_grad():
            model.inp.weight[0, 0] += 1
    with pytest.raises(AssertionError, match="mutated"), unchanged(model):
        model.train()
    with pytest.raises(AssertionError, match="mutated"), unchanged(model):
        model.out.weight = nn.Parameter(model.out.weight.detach().clone())  # same values, other object
    masks = {k: v.clone() for k, v in w.masks.items()}
    with pytest.raises(AssertionError, match="mutated"), unchanged(masks):
        masks["inp.weight"][0, 0] = ~masks["inp.weight"][0, 0]
    path = w.tmp / "touched.pt"
    path.write_bytes(b"a")
    with pytest.raises(AssertionError, match="mutated"), unchanged(path):
        path.write_bytes(b"b")


def test_misuse_detects_a_wrong_type_or_a_missing_culprit() -> None:
    with pytest.raises(AssertionError, match="not a MaskError"), misuse(MaskError):
        raise SpecError("x")
    with pytest.raises(AssertionError, match="not in message"), misuse(SpecError, "culprit"):
        raise SpecError("something else")
    with pytest.raises(pytest.fail.Exception), misuse(SpecError):
        pass


def test_correct_use_of_the_same_objects_passes(w: World, tmp_path: Path) -> None:
    with unchanged(w.model, w.masks, w.perm, w.saved):
        permuted = ma.apply_permutation(w.model, w.perm)
        ma.apply_permutation(w.model, w.perm, spec=w.spec)
        state = ma.permute_state_dict(w.model.state_dict(), w.perm, spec=w.spec)
        masks = ma.permute_mask(w.masks, w.perm, spec=w.spec)
        check_same_architecture(w.model, w.spec)
        assert ma.Permutation.load(w.saved, w.spec) == w.perm
        assert w.perm.compose(w.perm.inverse()).is_identity()
    with torch.no_grad():
        assert torch.allclose(permuted(X), w.model(X), rtol=1e-10, atol=1e-12)
        half = ma.apply_permutation(copy.deepcopy(w.model).float(), w.perm)  # any dtype permutes
        assert torch.allclose(half(X.float()), w.model(X).float(), rtol=1e-4, atol=1e-5)
    assert state.keys() == w.model.state_dict().keys() and masks.keys() == w.masks.keys()
    assert all(int(masks[k].sum()) == int(w.masks[k].sum()) for k in masks)
    copy_ = ma.Permutation(w.spec, {g: w.perm[g].tolist() for g in w.perm})
    assert copy_ == w.perm
    path = tmp_path / "again.pt"
    w.perm.save(path)
    assert ma.Permutation.load(path, w.spec) == w.perm
    residual_spec = ma.build_spec(w.residual, X)
    own = ma.random_permutation(residual_spec, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ma.apply_permutation(w.residual, own)(X), w.residual(X), rtol=1e-10, atol=1e-12)
