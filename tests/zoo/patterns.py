"""Hand-made patterns: small ``nn.Module`` s, one op family each, that real
code writes in more than one way (``x @ W.T``, ``.mT``, ``movedim``, ...).

Every pattern computes hidden units between an input layer and an output
layer, so that a correct spec has something to permute and a wrong one shows.
:func:`cases` lists them as :class:`~zoo.harness.Case` objects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .harness import DT, Case, Inputs, InputsFn

D_IN, HID, D_OUT, TOKENS = 6, 12, 5, 7


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def vectors(seed: int, batch: int) -> Inputs:
    return (_randn(seed, batch, D_IN),), {}


def tokens(seed: int, batch: int) -> Inputs:
    return (_randn(seed, batch, TOKENS, D_IN),), {}


def images(seed: int, batch: int) -> Inputs:
    return (_randn(seed, batch, 3, 8, 8),), {}


def token_ids_and_vectors(seed: int, batch: int) -> Inputs:
    """Token vectors and, per row, the position to pool (EOS pooling)."""
    pos = torch.randint(0, TOKENS, (batch,), generator=torch.Generator().manual_seed(seed))
    return (_randn(seed, batch, TOKENS, D_IN), pos), {}


def _p(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) / shape[-1] ** 0.5)


# ------------------------------------------------------------- transposes
class Transposed(nn.Module):
    """``x @ W1^T`` -> relu -> ``h @ W2^T`` with raw parameters, the transpose
    spelled as ``how``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w1, self.b1, self.w2 = _p(HID, D_IN), nn.Parameter(torch.randn(HID) * 0.1), _p(D_OUT, HID)

    def tr(self, w: Tensor) -> Tensor:
        if self.how == "T":
            return w.T
        if self.how == "mT":
            return w.mT
        if self.how == "t":
            return w.t()
        if self.how == "movedim":
            return w.movedim(0, 1)
        if self.how == "swapdims":
            return w.swapdims(0, 1)
        if self.how == "transpose":
            return torch.transpose(w, -1, -2)
        if self.how == "permute":
            return w.permute(1, 0)
        raise ValueError(self.how)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.tr(self.w1) + self.b1) @ self.tr(self.w2)


class Gram(nn.Module):
    """Square ``W``: ``h @ W @ W^T`` (both uses of one tensor), and
    ``h @ (V @ V^T)`` (a Gram matrix used as a layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(D_IN, HID), nn.Linear(HID, D_OUT)
        self.w, self.v = _p(HID, HID), _p(HID, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(h @ self.w @ self.w.T)
        h = torch.tanh(h @ (self.v @ self.v.T))
        return self.out(h)


class Einsum(nn.Module):
    """Implicit-output einsum ``"bi,oi"`` (no ``->``) and an explicit one."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = _p(HID, D_IN), _p(D_OUT, HID)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(torch.einsum("bi,oi", x, self.w1))
        return torch.einsum("bh,oh->bo", h, self.w2)


# ------------------------------------------------------- reparametrizations
class Reparam(nn.Module):
    """An MLP whose linear layers carry ``weight_norm`` / ``spectral_norm``
    (parametrizations) or legacy ``torch.nn.utils.weight_norm`` hooks."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(D_IN, HID), nn.Linear(HID, HID), nn.Linear(HID, D_OUT)
        for layer in (self.l1, self.l2):
            if how == "weight_norm":
                nn.utils.parametrizations.weight_norm(layer)
            elif how == "spectral_norm":
                nn.utils.parametrizations.spectral_norm(layer)
            elif how == "legacy_weight_norm":
                torch.nn.utils.weight_norm(layer)
            else:
                raise ValueError(how)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


# ------------------------------------------------- indexing non-permuted axes
class Pool(nn.Module):
    """Token MLP, then one token per row picked along the (unpermuted) token
    axis by ``how``, then a head: EOS pooling as in CLIP's text model."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.inp, self.mid, self.out = nn.Linear(D_IN, HID), nn.Linear(HID, HID), nn.Linear(HID, D_OUT)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))  # (B, T, HID)
        b = torch.arange(h.shape[0])
        if self.how == "index":
            p = h[b, pos]
        elif self.how == "index_select":
            p = h.index_select(1, torch.tensor([0, 3])).sum(1)
        elif self.how == "gather":
            p = h.gather(1, pos[:, None, None].expand(-1, 1, h.shape[-1])).squeeze(1)
        elif self.how == "take_along_dim":
            p = torch.take_along_dim(h, pos[:, None, None], dim=1).squeeze(1)
        elif self.how == "argmax":  # the position from the values themselves, as CLIP's `input_ids.argmax(-1)`
            p = h[b, x[..., 0].argmax(-1)]
        else:
            raise ValueError(self.how)
        return self.out(torch.relu(self.mid(p)))


class ShapeReads(nn.Module):
    """``select`` / ``slice`` / ``type_as`` / ``.to(other)`` whose results only
    give a shape or a dtype (or cast to the dtype the tensor already has)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(D_IN, HID), nn.Linear(HID, HID), nn.Linear(HID, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        n = h[:, 0].shape[0]  # select, for a size
        z = torch.zeros(h[..., :1].shape, dtype=h[:, 0].dtype)  # slice and select for shape / dtype
        h = (h + z) * (1.0 / n)
        h = self.mid(h).type_as(x)
        h = torch.relu(h).to(x)
        h = h.to(h[0].dtype)
        return self.out(h)


# -------------------------------------------------------------- recurrences
class Recurrent(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` (2 layers) over tokens, last step -> head."""

    def __init__(self, kind: str, bidirectional: bool = False) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.rnn = rnn(D_IN, HID, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(HID * (2 if bidirectional else 1), D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.rnn(x)
        return self.out(y[:, -1])


# ------------------------------------------------------- channel reshuffles
class PixelShuffle(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        if how == "shuffle":
            self.a, self.b = nn.Conv2d(3, 4 * 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        else:
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(16, 6, 3, padding=1)
        self.head = nn.Linear(6, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        h = F.pixel_shuffle(h, 2) if self.how == "shuffle" else F.pixel_unshuffle(h, 2)
        return self.head(torch.relu(self.b(h)).mean((2, 3)))


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle (``view`` / ``transpose`` / ``reshape``)
    between grouped convs, and ``nn.ChannelShuffle``."""

    def __init__(self, module: bool) -> None:
        super().__init__()
        self.module = module
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1, groups=2)
        self.c = nn.Conv2d(8, 8, 1, groups=2)
        self.shuffle = nn.ChannelShuffle(2)
        self.head = nn.Linear(8, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        if self.module:
            h = self.shuffle(h)
        else:
            n, c, hh, ww = h.shape
            h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)
        return self.head(torch.relu(self.c(h)).mean((2, 3)))


# ------------------------------------------------------------------ experts
class StackedExperts(nn.Module):
    """Experts as stacked weights ``(E, d, h)``: ``bmm`` (or ``einsum``),
    soft routing, sum over experts."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, e = how, 3
        self.inp, self.router, self.out = nn.Linear(D_IN, HID), nn.Linear(HID, e), nn.Linear(HID, D_OUT)
        self.w1, self.w2 = _p(e, HID, 8), _p(e, 8, HID)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))  # (B, HID)
        gate = torch.softmax(self.router(h), -1)  # (B, E)
        if self.how == "bmm":
            xe = h.unsqueeze(0).expand(self.w1.shape[0], -1, -1)  # (E, B, HID)
            y = torch.bmm(torch.relu(torch.bmm(xe, self.w1)), self.w2)  # (E, B, HID)
            y = (y * gate.T.unsqueeze(-1)).sum(0)
        else:
            y = torch.einsum("ebk,ekh->ebh", torch.relu(torch.einsum("bh,ehk->ebk", h, self.w1)), self.w2)
            y = torch.einsum("ebh,be->bh", y, gate)
        return self.out(torch.relu(y + h))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, HID)
        self.attn = nn.MultiheadAttention(HID, 3, batch_first=True)
        self.out = nn.Linear(HID, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(torch.relu(h + a)).mean(1)


class TransformerLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (its fast path in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, HID)
        self.layer = nn.TransformerEncoderLayer(HID, 3, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(HID, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.layer(self.inp(x))).mean(1)


# ----------------------------------------------------------- token / space
class Roll(nn.Module):
    """``torch.roll`` along spatial axes (Swin's shifted windows) or along tokens."""

    def __init__(self, tokens: bool) -> None:
        super().__init__()
        self.tokens = tokens
        if tokens:
            self.a, self.b = nn.Linear(D_IN, HID), nn.Linear(HID, HID)
        else:
            self.a, self.b = nn.Conv2d(3, HID, 3, padding=1), nn.Conv2d(HID, HID, 3, padding=1)
        self.head = nn.Linear(HID, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        if self.tokens:
            h = torch.roll(h, shifts=2, dims=1)
            return self.head(torch.relu(self.b(h))[:, 0])
        h = torch.roll(h, shifts=(1, -2), dims=(2, 3))
        return self.head(torch.relu(self.b(h))[:, :, 0, 0])


class SplitSizes(nn.Module):
    """``split_with_sizes`` along channels: two unequal parts, each through
    its own nonlinearity and conv, then concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.p, self.q = nn.Conv2d(3, 4, 1), nn.Conv2d(5, 4, 1)
        self.head = nn.Linear(8, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        u, v = torch.split(torch.relu(self.a(x)), [3, 5], dim=1)
        h = torch.cat([torch.relu(self.p(u)), torch.tanh(self.q(v))], 1)
        return self.head(h.mean((2, 3)))


class RepeatInterleave(nn.Module):
    """``repeat_interleave`` along hidden channels (GQA's key/value heads)
    and along tokens."""

    def __init__(self, tokens: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.a = nn.Linear(D_IN, HID)
        self.b = nn.Linear(HID if tokens else 2 * HID, HID)
        self.head = nn.Linear(HID, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))  # (B, T, HID)
        h = h.repeat_interleave(2, dim=1) if self.tokens else h.repeat_interleave(2, dim=-1)
        return self.head(torch.relu(self.b(h))).mean(1)


class Unfold(nn.Module):
    """``Tensor.unfold`` (sliding windows over tokens), ``F.unfold`` with a
    matmul (im2col conv) and ``F.fold``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        if how == "tensor":
            self.a, self.b = nn.Linear(D_IN, HID), nn.Linear(HID * 3, HID)
        else:
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.w = _p(HID, 4 * 9)
            self.b = nn.Conv2d(HID, HID, 1)
        self.head = nn.Linear(HID, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        if self.how == "tensor":  # (B, T, HID) -> (B, T-2, HID, 3) windows
            w = h.unfold(1, 3, 1)
            h = self.b(w.flatten(2))
            return self.head(torch.relu(h)).mean(1)
        cols = F.unfold(h, 3, padding=1)  # (B, 4*9, 64)
        y = (self.w @ cols).view(h.shape[0], HID, 8, 8)  # im2col conv
        if self.how == "fold":
            y = F.fold(F.unfold(y, 2, stride=2), (8, 8), 2, stride=2)
        return self.head(torch.relu(self.b(torch.relu(y))).mean((2, 3)))


# ---------------------------------------------------- modes and regions
class AuxHead(nn.Module):
    """An auxiliary head (a parameter) used only when ``self.training``."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(D_IN, HID), nn.Linear(HID, D_OUT)
        self.aux = nn.Linear(HID, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        y = self.out(h)
        if self.training:
            y = y + 0.5 * self.aux(h)
        return y


class Cond(nn.Module):
    """``torch.cond`` on the input's values, both branches using layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = (
            nn.Linear(D_IN, HID),
            nn.Linear(HID, HID),
            nn.Linear(HID, HID),
            nn.Linear(HID, D_OUT),
        )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        pred = x.sum() > 0  # the same branches under opposite predicates: both run on any input
        h = torch.cond(pred, lambda t: torch.relu(self.a(t)), lambda t: torch.tanh(self.b(t)), (h,))
        h = torch.cond(~pred, lambda t: torch.relu(self.a(t)), lambda t: torch.tanh(self.b(t)), (h,))
        return self.out(h)


class Regions(nn.Module):
    """Layers inside ``torch.no_grad()``, ``torch.autocast(enabled=False)``
    and ``torch.enable_grad()`` regions."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = (
            nn.Linear(D_IN, HID),
            nn.Linear(HID, HID),
            nn.Linear(HID, HID),
            nn.Linear(HID, D_OUT),
        )

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            h = torch.relu(self.inp(x))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            h = torch.relu(self.a(h))
        with torch.enable_grad():
            h = torch.relu(self.b(h))
        return self.out(h)


class Checkpointed(nn.Module):
    """Blocks under activation checkpointing (``torch.utils.checkpoint``)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(D_IN, HID), nn.Linear(HID, D_OUT)
        self.block = nn.Sequential(nn.Linear(HID, 16), nn.GELU(), nn.Linear(16, HID))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.inp(x))
        h = h + checkpoint(self.block, h, use_reentrant=False)
        return self.out(h)


# ------------------------------------------------------- classic layers
class Classic(nn.Module):
    """Depthwise conv, GroupNorm, ConvTranspose2d, InstanceNorm, a squeeze-
    excitation gate, LayerNorm over channels: the layers of small CNNs."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        if how == "depthwise":
            self.m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        elif how == "groupnorm":
            self.m = nn.Sequential(nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.SiLU())
        elif how == "conv_transpose":
            self.m = nn.Sequential(
                nn.ConvTranspose2d(8, 6, 2, stride=2), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1)
            )
        elif how == "instancenorm":
            self.m = nn.Sequential(nn.InstanceNorm2d(8, affine=True), nn.ReLU())
        elif how == "squeeze_excite":
            self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        elif how == "layernorm2d":
            self.ln = nn.LayerNorm(8)
        else:
            raise ValueError(how)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, D_OUT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        if self.how == "squeeze_excite":
            s = torch.sigmoid(self.se2(torch.relu(self.se1(h.mean((2, 3), keepdim=True)))))
            h = h * s
        elif self.how == "layernorm2d":
            h = self.ln(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            h = self.m(h)
        return self.head(torch.relu(self.b(h)).mean((2, 3)))


class TiedEmbedding(nn.Module):
    """Embedding whose weight is reused as the output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, HID)
        self.mid = nn.Linear(HID, HID)
        self.norm = nn.LayerNorm(HID)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.norm(self.emb(ids) + torch.relu(self.mid(self.emb(ids))))
        return h @ self.emb.weight.T


def _ids(seed: int, batch: int) -> Inputs:
    return (torch.randint(0, 20, (batch, TOKENS), generator=torch.Generator().manual_seed(seed)),), {}


def _maskalign_models() -> list[Case]:
    from maskalign.models import MLP, VGG11, ResNet20

    def img16(seed: int, batch: int) -> Inputs:
        return (_randn(seed, batch, 3, 16, 16),), {}

    def flat(seed: int, batch: int) -> Inputs:
        return (_randn(seed, batch, 64),), {}

    return [
        Case(
            "maskalign-resnet20",
            "maskalign",
            lambda: (ResNet20(width=1, num_classes=7, in_channels=3), img16),
            coverage=1.0,
        ),
        Case(
            "maskalign-vgg11",
            "maskalign",
            lambda: (VGG11(num_classes=7, in_channels=3, image_size=16), img16),
            coverage=1.0,
        ),
        Case("maskalign-mlp", "maskalign", lambda: (MLP(in_features=64), flat), coverage=1.0),
    ]


def _case(name: str, make: Callable[[], nn.Module], inputs: InputsFn, **kw: object) -> Case:
    return Case(name, "pattern", lambda: (make(), inputs), **kw)  # type: ignore[arg-type]


def cases() -> list[Case]:
    c = [
        _case(f"transpose-{how}", lambda how=how: Transposed(how), vectors)
        for how in ("T", "mT", "t", "movedim", "swapdims", "transpose", "permute")
    ]
    c += [
        _case("gram-w-wT", Gram, vectors),
        _case("einsum-implicit", Einsum, vectors),
        _case("weight-norm", lambda: Reparam("weight_norm"), vectors),
        _case("spectral-norm", lambda: Reparam("spectral_norm"), vectors),
        _case("legacy-weight-norm", lambda: Reparam("legacy_weight_norm"), vectors),
    ]
    c += [
        _case(f"pool-{how}", lambda how=how: Pool(how), token_ids_and_vectors)
        for how in ("index", "index_select", "gather", "take_along_dim", "argmax")
    ]
    c += [
        _case("shape-reads-type-as", ShapeReads, tokens),
        _case("lstm", lambda: Recurrent("lstm"), tokens),
        _case("gru", lambda: Recurrent("gru"), tokens),
        _case("lstm-bidirectional", lambda: Recurrent("lstm", True), tokens),
        _case("pixel-shuffle", lambda: PixelShuffle("shuffle"), images),
        _case("pixel-unshuffle", lambda: PixelShuffle("unshuffle"), images),
        _case("channel-shuffle-view", lambda: ChannelShuffle(False), images),
        _case("channel-shuffle-module", lambda: ChannelShuffle(True), images),
        _case("experts-bmm", lambda: StackedExperts("bmm"), vectors),
        _case("experts-einsum", lambda: StackedExperts("einsum"), vectors),
        _case("multihead-attention", MHA, tokens),
        _case("transformer-encoder-layer", TransformerLayer, tokens),
        _case("roll-spatial", lambda: Roll(False), images),
        _case("roll-tokens", lambda: Roll(True), tokens),
        _case("split-with-sizes", SplitSizes, images),
        _case("repeat-interleave-channels", lambda: RepeatInterleave(False), tokens),
        _case("repeat-interleave-tokens", lambda: RepeatInterleave(True), tokens),
        _case("tensor-unfold", lambda: Unfold("tensor"), tokens),
        _case("F-unfold", lambda: Unfold("im2col"), images),
        _case("F-fold", lambda: Unfold("fold"), images),
        _case("aux-head-train-only", AuxHead, vectors),
        _case("torch-cond", Cond, vectors),
        _case("no-grad-autocast-regions", Regions, vectors),
        _case("activation-checkpointing", Checkpointed, vectors),
        _case("tied-embedding", TiedEmbedding, _ids),
    ]
    c += [
        _case(f"cnn-{how}", lambda how=how: Classic(how), images)
        for how in ("depthwise", "groupnorm", "conv_transpose", "instancenorm", "squeeze_excite", "layernorm2d")
    ]
    return c + _maskalign_models()
