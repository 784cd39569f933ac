"""What identifies a stage instance of ``maskalign reproduce``: the
settings each stage depends on, its key, its name in words, and the seeds of
its random draws.

Each training run is seeded from (seed, stage, role or round, k, sparsity,
method) only (:func:`derive_seed`), so a resumed run gives the same numbers as
an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DATA_ORDER",
    "DENSE",
    "DIVERSITY",
    "IMP",
    "LMC",
    "MATCH",
    "RECIPE",
    "SPARSE",
    "StageRef",
    "cpu_state",
    "derive_seed",
    "seeded_generator",
    "level_key",
    "sparse_fields",
    "sparse_key",
]

# The settings each stage depends on (besides the data fingerprint and the
# instance's seed / k / sparsity / method). Device and output folder are not
# among them: they do not change what is computed.
DENSE = (
    "dataset",
    "model",
    "width",
    "hidden",
    "epochs",
    "rewind_epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "augment",
    "amp",
)
IMP = (*DENSE, "sparsities", "prune_rate", "imp_epochs", "imp_lr")
# The matching recipe: what the permutation (and so every stage that uses it) depends on.
RECIPE = ("match_points", "match_stream_points")
MATCH = (*DENSE, *RECIPE)
SPARSE = (*IMP, "sparse_lr")
LMC = (*SPARSE, *RECIPE, "methods", "barrier_points", "bn_batches")
DIVERSITY = (*SPARSE, *RECIPE, "methods", "seeds")

#: How training batches are drawn (recorded in every stage's settings): since
#: maskalign 0.2 one global order per epoch with rank shares
#: (:class:`~maskalign.repro.training.InMemoryData`), where 0.1 shuffled
#: with the run's generator directly. A folder of 0.1 stages is then told
#: apart (a StageMismatchError naming ``data_order``) instead of being
#: resumed with stages trained in the other order.
DATA_ORDER = "global-epoch-order/rank-shares"


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the repr of ``parts`` (stable across processes)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def seeded_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model``'s ``state_dict``."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def level_key(value: float) -> str:
    """A sparsity as it appears in keys and file names: ``0.9`` -> ``"0.9"``."""
    return f"{value:g}"


def sparse_fields(method: str) -> tuple[str, ...]:
    """The settings a sparse run of ``method`` depends on: the permuted mask
    also on the matching recipe."""
    return (*SPARSE, *RECIPE) if method == "permuted" else SPARSE


def sparse_key(seed: int, k: int, target: float, method: str) -> str:
    """Key of a sparse-training stage instance, e.g. ``seed0/k1/s0.9/lth``."""
    return f"seed{seed}/k{k}/s{level_key(target)}/{method}"


@dataclass(frozen=True)
class StageRef:
    """One stage instance: its stage (one of :data:`STAGES`), its key (its
    folder under ``OUT/stages/<stage>``), the settings it depends on (what
    :meth:`StageStore.finished` compares) and its name in words for the
    progress display, e.g. ``sparse seed 2 / k=5 / 99% / permuted``. Made by
    the ``_Run.ref_*`` methods only, which both the stages and
    :meth:`_Run.plan` use."""

    stage: str
    key: str
    settings: dict[str, Any]
    words: str
