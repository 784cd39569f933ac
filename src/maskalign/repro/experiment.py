"""The paper's lottery-ticket transfer experiment, as resumable stages.

Adnan, Jain, Sharma, Krishnan, Ioannou (ICML 2025); method of the workshop
version's Appendix A.5, settings of its Appendix A.1. Per seed:

1. ``dense``: train A and B from two random initialisations for T epochs,
   keeping the rewind checkpoints A_k, B_k for every k of the sweep;
2. ``imp``: IMP on A_T without weight rewinding (:mod:`maskalign.sparse.imp`,
   ``rewind="none"``): each round prunes 20% of the remaining weights
   globally by magnitude and fine-tunes the survivors for ``imp_epochs`` at
   ``imp_lr``, down to every target sparsity -> masks m_A and the pruned
   solution ("IMP");
3. ``match``: activation matching A_T -> B_T gives the permutation pi (saved
   with :meth:`~maskalign.Permutation.save`);
4. ``sparse``: for every rewind point k and sparsity, train for T - k epochs
   at ``sparse_lr``: LTH (A_k, m_A), naive (B_k, m_A), permuted
   (B_k, pi(m_A)) and random (B_k, a random mask with m_A's per-layer density);
5. ``lmc``: loss/error along the line between A and B before and after
   matching, and between the sparse solutions (LTH-naive, pi(LTH)-permuted,
   naive-permuted, interpolating the effective weights w * m).

Then, over seeds, ``diversity``: disagreement, KL and JS divergence (nats)
and ensemble accuracy (averaged probabilities) of the dense, IMP, LTH, naive,
permuted and random solutions, from float64 log-probabilities on the test set
(ICML paper, Table 1), in two modes: ``pairwise`` (mean over pairs of seeds)
and ``reference`` (each seed's model against the dense A_T of the same seed,
averaged over seeds). Every member there has its own A_s and its own mask.

Then the ICML paper's own Table-1 protocol (Sec. 4.2, after Evci et al. 2022),
``shared-mask``, at one (sparsity, k) (``table1_sparsity``, ``table1_k``;
default 0.9 and the largest k): ONE pruned model A_0 and ONE mask m_{A_0}
shared by every member s = 0 .. seeds - 1:

* LTH: A_0,k with m_{A_0}, trained with the data order of seed s;
* naive: B_s,k with m_{A_0};
* permuted: B_s,k with pi'_s(m_{A_0}), pi'_s the activation matching
  A_0,T -> B_s,T (stage ``shared-match``; pi'_0 = pi_0);
* dense and IMP: the independently trained A_s,T and IMP solutions.

Member 0 of each method is the seed-0 run of ``sparse`` (same start, mask
and data order); members s >= 1 are stage ``shared-sparse``, and the pairwise
diversity of each ensemble is stage ``shared-diversity``.

With ``match_epochs`` or ``match_sources``, the studies of
:mod:`maskalign.repro.studies` follow (early matching, other sources of the
permutation, permuted ensembles with early matching), each seed's after its
``sparse`` stages and the ensembles after the shared-mask protocol.

Every stage writes its artifacts and a manifest atomically under
``OUT/stages`` (:mod:`maskalign.repro.stages`); a re-run with the same output folder
loads finished stages and computes the rest. Each training run is seeded from
(seed, stage, role or round, k, sparsity, method) only, so a resumed run gives
the same numbers as an uninterrupted one (on the CPU; CUDA kernels may not be
bitwise deterministic).

Under ``torchrun`` (an initialised ``torch.distributed`` process group of N
ranks, :mod:`maskalign.repro.distributed`): every training stage runs
data-parallel (:func:`~maskalign.repro.training.train` with
``DistributedDataParallel``; each rank its share of every global batch of
``batch_size``, so the numbers are one process's up to float reduction
order); ``match`` matches each rank's share of the matching batches with the
statistics all-reduced (:func:`~maskalign.match_activations`), and every
rank checks that it holds rank 0's permutation, as IMP checks its masks;
``lmc``, ``diversity`` and ``shared-diversity`` (evaluation only) run on
rank 0 while the others wait. Only rank 0 writes (``config.json``, every
artifact and manifest); the others load what it wrote
(:class:`~maskalign.repro.stages.StageStore`). With BatchNorm and without
``sync_bn``, each rank normalises over its own share: the stages then also
record ``bn_stats`` (the number of ranks), since the numbers depend on it.

Data: the stages read it through one small interface
(:class:`~maskalign.repro.rundata.RunData`): the in-memory data sets
(:mod:`maskalign.repro.data`, held on the device), or, for
``dataset="imagenet"``, an ImageFolder streamed by
:mod:`maskalign.repro.imagenet` (training through
:class:`~maskalign.repro.imagenet.ImageFolderTrainData`, which drops the last
incomplete global batch of an epoch; the test split streamed at every
evaluation, each rank its share; matching and BatchNorm re-estimation on a
fixed subset of ``match_samples`` training images, 10,000 by default;
``channels_last`` on CUDA; ``test_top5`` in the dense, IMP and sparse
records). Its stages also record ``match_samples`` and ``loader_workers``
(the workers seed the random crops). Models of image data run in
``channels_last`` (in-memory data on every device, the ImageFolder on CUDA).
"""

from __future__ import annotations

import functools
import itertools
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils.fileio import atomic_write
from ..errors import ArgumentTypeError, ConfigError, _describe
from ..evaluation.lmc import LMCResult, lmc_barrier
from ..evaluation.metrics import diversity, ensemble_accuracy
from ..matching.activation import match_activations
from ..models import build_model
from ..permutation import Permutation, apply_permutation, permute_mask
from ..sparse.imp import SAME_LEVEL_TOL, IMPRound, imp_schedule, iterative_magnitude_pruning
from ..sparse.masks import random_masks_like, sparsity
from ..spec.permutation_spec import PermutationSpec, build_spec
from . import distributed
from .data import DatasetSplits
from .presets import METHODS, PRESETS, ReproduceConfig
from .progress import StageObserver, percent
from .refs import (
    DATA_ORDER,
    DENSE,
    DIVERSITY,
    IMP,
    LMC,
    MATCH,
    StageRef,
    cpu_state,
    derive_seed,
    level_key,
    seeded_generator,
    sparse_fields,
    sparse_key,
)
from .rundata import MATCH_BATCH, MemoryData, RunData, load_run_data
from .stages import StageMismatchError, StageStore, settings_hash
from .studies import STUDY_STAGES, Studies
from .training import TrainConfig, train

__all__ = ["METHODS", "SHARED_MASK", "SHARED_MASK_METHODS", "STAGES", "ReproduceConfig", "resolve_device", "reproduce"]

#: Stages in the order they run; ``on_stage_end`` receives these names.
STAGES: tuple[str, ...] = (
    "dense",
    "imp",
    "match",
    "sparse",
    "lmc",
    "diversity",
    "shared-match",
    "shared-sparse",
    "shared-diversity",
    *STUDY_STAGES,
)

#: Name (the rows' ``protocol``) of the ICML paper's Table-1 protocol: one
#: pruned A_0 and one mask m_{A_0} shared by every ensemble member.
SHARED_MASK = "shared-mask"

#: The methods of the shared-mask protocol (those of ``config.methods`` are run).
SHARED_MASK_METHODS: tuple[str, ...] = ("lth", "naive", "permuted")

#: The reference model of the ``reference`` diversity mode.
_REFERENCE = "dense A_T of the same seed"


# LMC curves between sparse solutions: (label, run a, run b, map a to B's
# units by pi). LTH's solution lives in A's units, so pi(lth) meets permuted.
_SPARSE_PAIRS: tuple[tuple[str, str, str, bool], ...] = (
    ("lth-naive", "lth", "naive", False),
    ("pi(lth)-permuted", "lth", "permuted", True),
    ("naive-permuted", "naive", "permuted", False),
)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name as given.

    Raises:
        ConfigError: (a ``ValueError``) the name is not a device, or a CUDA
            device is requested but none is available (or its index is
            beyond the visible devices).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"Setting 'device' (--device) is {name!r}, which is not a device; pass auto, cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Setting 'device' (--device) is {name!r} but CUDA is not available on this machine; "
            "pass --device cpu or auto."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"Setting 'device' (--device) is {name!r} but only {torch.cuda.device_count()} CUDA device(s) are "
            "visible; pass cuda:0 .. cuda:N-1, or auto."
        )
    return device


class _Run:
    """One execution of :func:`reproduce`: the stages, loaded or computed."""

    def __init__(
        self,
        config: ReproduceConfig,
        data: RunData | DatasetSplits,
        device: torch.device,
        store: StageStore,
        fingerprint: str,
        log: Callable[[str], None],
        on_stage_end: Callable[[str, str], None] | None,
        observer: StageObserver | None = None,
        world: int = 1,
    ) -> None:
        self.config = config
        self.world = world
        # in-memory splits (already on the device) are read through MemoryData
        self.data: RunData = (
            MemoryData(data, device, fingerprint, config.match_samples) if isinstance(data, DatasetSplits) else data
        )
        self.device = device
        self.store = store
        self.fingerprint = fingerprint
        self.log = log
        self.on_stage_end = on_stage_end
        self.observer = observer
        self.targets = self.data.targets
        self._spec: PermutationSpec | None = None
        self._has_bn: bool | None = None
        self.studies = Studies(self)

    # ------------------------------------------------------------ helpers
    def settings(self, fields: Sequence[str], **instance: object) -> dict[str, Any]:
        """The values of ``fields`` plus the data fingerprint and ``instance``,
        and ``bn_stats`` when BatchNorm normalises over per-rank shares
        (:meth:`per_rank_bn`): absent otherwise, so one process and N
        processes with ``sync_bn`` share their stages."""
        values = self.config.to_dict()
        per_rank = {"bn_stats": f"per rank of {self.world}"} if self.per_rank_bn() else {}
        base = {f: values[f] for f in fields}
        extra = self.data.settings()
        return {**base, "data": self.fingerprint, "data_order": DATA_ORDER, **extra, **per_rank, **instance}

    def per_rank_bn(self) -> bool:
        """Whether training normalises BatchNorm over each rank's share
        rather than the global batch: more than one rank, a model with
        BatchNorm and no ``sync_bn``."""
        return self.world > 1 and not self.config.sync_bn and self.has_bn()

    # One method per stage: the key, settings and words of an instance.
    def ref_dense(self, seed: int, role: str) -> StageRef:
        settings = self.settings(DENSE, seed=seed, role=role)
        return StageRef("dense", f"seed{seed}-{role}", settings, f"dense seed {seed} / {role}")

    def ref_imp(self, seed: int) -> StageRef:
        return StageRef("imp", f"seed{seed}", self.settings(IMP, seed=seed), f"imp seed {seed}")

    def ref_match(self, seed: int) -> StageRef:
        return StageRef("match", f"seed{seed}", self.settings(MATCH, seed=seed), f"match seed {seed}")

    def ref_shared_match(self, seed: int) -> StageRef:
        settings = self.settings(MATCH, seed=seed, mask_seed=0)
        return StageRef("shared-match", f"A0-B{seed}", settings, f"shared-match A seed 0 / B seed {seed}")

    def ref_sparse(self, seed: int, k: int, target: float, method: str, *, shared: bool = False) -> StageRef:
        instance: dict[str, object] = {"seed": seed, "k": k, "sparsity": target, "method": method}
        stage = "shared-sparse" if shared else "sparse"
        settings = self.settings(sparse_fields(method), **instance, **({"mask_seed": 0} if shared else {}))
        words = f"{stage} seed {seed} / k={k} / {percent(target)} / {method}"
        return StageRef(stage, sparse_key(seed, k, target, method), settings, words)

    def ref_lmc(self, seed: int) -> StageRef:
        return StageRef("lmc", f"seed{seed}", self.settings(LMC, seed=seed), f"lmc seed {seed}")

    def ref_diversity(self) -> StageRef:
        return StageRef("diversity", "all", self.settings(DIVERSITY), "diversity")

    def ref_shared_diversity(self, target: float, k: int) -> StageRef:
        settings = self.settings(DIVERSITY, k=k, sparsity=target)
        words = f"shared-diversity k={k} / {percent(target)}"
        return StageRef("shared-diversity", f"k{k}/s{level_key(target)}", settings, words)

    def finished(self, ref: StageRef) -> dict[str, Any] | None:
        """The stored record of ``ref`` (told to the observer as reused), or
        ``None`` when it is to be computed."""
        record = self.store.finished(ref.stage, ref.key, ref.settings)
        if record is not None and self.observer is not None:
            self.observer.reused(ref.stage, ref.key, ref.words)
        return record

    def train_config(self, epochs: int, lr: float) -> TrainConfig:
        c = self.config
        return TrainConfig(epochs, lr, c.momentum, c.weight_decay, c.batch_size, c.augment, c.amp, c.sync_bn)

    def build(self) -> nn.Module:
        s = self.data
        return build_model(
            self.config.model,
            num_classes=s.num_classes,
            in_channels=s.in_channels,
            image_size=s.image_size,
            width=self.config.width,
            hidden=self.config.hidden,
        )

    def from_state(self, state: Mapping[str, Tensor]) -> nn.Module:
        """A model of the run's architecture holding ``state``, on the device."""
        model = self.build()
        model.load_state_dict(state)
        return self.to_device(model)

    def to_device(self, model: nn.Module) -> nn.Module:
        """``model`` on the device (in ``channels_last`` when the data is)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.data.channels_last else model  # type: ignore[call-overload]

    def load_model(self, stage: str, key: str, name: str) -> nn.Module:
        """The model whose ``state_dict`` is artifact ``name`` of a stage."""
        return self.from_state(self.store.load_tensors(stage, key, name))

    def spec(self, model: nn.Module) -> PermutationSpec:
        if self._spec is None:
            self._spec = build_spec(model, self.data.example_inputs())
        return self._spec

    def has_bn(self) -> bool:
        if self._has_bn is None:
            self._has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.build().modules())
        return self._has_bn

    @contextmanager
    def stage(self, ref: StageRef) -> Iterator[None]:
        """Time, log and tell the observer about a computed stage; then call
        ``on_stage_end``."""
        began = time.perf_counter()
        if self.observer is not None:
            self.observer.begin(ref.stage, ref.key, ref.words)
        yield
        seconds = time.perf_counter() - began
        self.log(f"[{ref.stage} {ref.key}] computed in {seconds:.1f} s")
        if self.observer is not None:
            self.observer.computed(ref.stage, ref.key, ref.words, seconds)
        if self.on_stage_end is not None:
            self.on_stage_end(ref.stage, ref.key)

    # ------------------------------------------------------------- stages
    def dense(self, seed: int, role: str) -> dict[str, Any]:
        """Train dense ``role`` ("A" or "B") of ``seed``; keeps ``final.pt`` and
        ``rewind_k<k>.pt`` for each k."""
        ref = self.ref_dense(seed, role)
        key, settings = ref.key, ref.settings
        record = self.finished(ref)
        if record is not None:
            return record
        with self.stage(ref):
            torch.manual_seed(derive_seed(seed, "dense", role, "init"))
            model = self.to_device(self.build())
            rewinds = set(self.config.rewind_epochs)

            def keep(epoch: int, m: nn.Module) -> None:
                if epoch in rewinds:
                    self.store.save_tensors("dense", key, f"rewind_k{epoch}.pt", cpu_state(m))

            keep(0, model)
            train(
                model,
                self.data.train,
                self.train_config(self.config.epochs, self.config.lr),
                generator=seeded_generator(seed, "dense", role, "data"),
                on_epoch_end=keep,
                distributed=True,
            )
            self.store.save_tensors("dense", key, "final.pt", cpu_state(model))
            scores = self.data.scores(model)
            record = self.store.finish("dense", key, settings, {"seed": seed, "model": role, **scores})
        return record

    def imp(self, seed: int) -> dict[str, Any]:
        """IMP on A_T of ``seed`` (no rewinding); keeps ``target_<s>.pt``
        (weights and masks) per target and checkpoints every round."""
        ref = self.ref_imp(seed)
        key, settings = ref.key, ref.settings
        record = self.finished(ref)
        if record is not None:
            return record
        with self.stage(ref):
            c = self.config
            model = self.load_model("dense", f"seed{seed}-A", "final.pt")
            checkpoint = self.store.path("imp", key, "last_round.pt")
            masks: dict[str, Tensor] | None = None
            history: list[dict[str, Any]] = []
            if checkpoint.is_file():
                saved = self.store.load_tensors("imp", key, "last_round.pt")
                if saved["settings"] == settings_hash(settings):
                    model.load_state_dict(saved["state"])
                    masks = {k: v.to(self.device) for k, v in saved["masks"].items()}
                    history = list(saved["history"])
                    self.log(f"[imp {key}] resuming after round {history[-1]['round']}")

            def train_fn(m: nn.Module, imp_round: IMPRound) -> None:
                distributed.assert_same_on_ranks(
                    distributed.tensor_digest(imp_round.masks), f"The IMP mask of {key} round {imp_round.index}"
                )
                config = self.train_config(c.imp_epochs, c.imp_lr)
                train(
                    m,
                    self.data.train,
                    config,
                    generator=seeded_generator(seed, "imp", imp_round.index),
                    masks=imp_round.masks,
                    distributed=True,
                )

            def on_round_end(imp_round: IMPRound, m: nn.Module) -> None:
                scores = self.data.scores(m)  # test_loss, test_acc and any other metric (ImageNet: test_top5)
                acc = scores["test_acc"]
                history.append({"round": imp_round.index, "sparsity": imp_round.sparsity, **scores})
                cpu_masks = {k: v.cpu() for k, v in imp_round.masks.items()}
                for target in c.sparsities:
                    if abs(target - imp_round.sparsity) <= SAME_LEVEL_TOL:
                        payload = {"state": cpu_state(m), "masks": cpu_masks, **scores}
                        self.store.save_tensors("imp", key, f"target_{level_key(target)}.pt", payload)
                state = {"settings": settings_hash(settings), "state": cpu_state(m), "masks": cpu_masks}
                self.store.save_tensors("imp", key, "last_round.pt", {**state, "history": history})
                self.log(f"[imp {key}] round {imp_round.index}: sparsity {imp_round.sparsity:.4f}, test acc {acc:.4f}")
                if self.observer is not None:
                    self.observer.note(f"round {imp_round.index} of {len(imp_schedule(c.sparsities, c.prune_rate))}")
                if self.on_stage_end is not None:
                    self.on_stage_end("imp-round", f"{key}/round{imp_round.index}")

            iterative_magnitude_pruning(
                model,
                train_fn,
                c.sparsities,
                rate=c.prune_rate,
                rewind="none",
                masks=masks,
                on_round_end=on_round_end,
                inplace=True,
            )
            targets = []
            for target in c.sparsities:
                saved = self.store.load_tensors("imp", key, f"target_{level_key(target)}.pt")
                targets.append(
                    {
                        "seed": seed,
                        "sparsity": target,
                        "method": "imp",
                        **{name: value for name, value in saved.items() if name.startswith("test_")},
                        "mask_sparsity": sparsity(saved["masks"]).global_,
                    }
                )
            record = self.store.finish("imp", key, settings, {"targets": targets, "history": history})
            if distributed.is_main():
                checkpoint.unlink(missing_ok=True)
        return record

    def match(self, seed: int) -> tuple[dict[str, Any], Permutation]:
        """Activation matching A_T -> B_T of ``seed`` on the training data."""
        return self._match(self.ref_match(seed), seed, seed)

    def shared_match(self, seed: int) -> tuple[dict[str, Any], Permutation]:
        """pi'_s of the shared-mask protocol: activation matching A_0,T ->
        B_s,T. For ``seed`` 0 this is pi_0 (stage ``match``); otherwise stage
        ``shared-match``, key ``A0-B<s>``."""
        if seed == 0:
            return self.match(0)
        return self._match(self.ref_shared_match(seed), 0, seed)

    def _match(self, ref: StageRef, seed_a: int, seed_b: int) -> tuple[dict[str, Any], Permutation]:
        """Activation matching A_T of ``seed_a`` -> B_T of ``seed_b`` as
        stage instance ``ref`` (the permutation in ``perm.pt``)."""
        stage, key = ref.stage, ref.key
        model_a = self.load_model("dense", f"seed{seed_a}-A", "final.pt")
        spec = self.spec(model_a)
        record = self.finished(ref)
        if record is None:
            with self.stage(ref):
                model_b = self.load_model("dense", f"seed{seed_b}-B", "final.pt")
                # each rank its share of the batches; match_activations all-reduces the statistics
                data = self.data.match_batches()
                c = self.config
                perm = match_activations(
                    model_a,
                    model_b,
                    data,
                    spec,
                    points=c.match_points,
                    stream_points=c.match_stream_points,
                    progress=False,
                )
                digest = distributed.tensor_digest({g: perm[g] for g in perm})
                distributed.assert_same_on_ranks(digest, f"The permutation of {stage}/{key}")
                if distributed.is_main():
                    perm.save(self.store.path(stage, key, "perm.pt"))
                identity = {"seed": seed_b} if seed_a == seed_b else {"seed": seed_b, "seed_a": seed_a}
                recipe = {
                    "method": perm.report["method"],
                    "cost": perm.report["cost"],
                    "points": perm.report["points"],
                    "stream_points": perm.report["stream_points"],
                    "samples": self.data.match_samples,
                    "batch_size": MATCH_BATCH,
                }
                record = self.store.finish(
                    stage, key, ref.settings, {**identity, "recipe": recipe, "groups": perm.report.get("groups", {})}
                )
        return record, Permutation.load(self.store.path(stage, key, "perm.pt"), spec)

    def method_masks(self, seed: int, target: float, perm: Permutation) -> dict[str, dict[str, Tensor]]:
        """The mask of each method at ``target`` (on the device)."""
        m_a = self.store.load_tensors("imp", f"seed{seed}", f"target_{level_key(target)}.pt")["masks"]
        candidates = {
            "lth": m_a,
            "naive": m_a,
            "permuted": permute_mask(m_a, perm),
            "random": random_masks_like(m_a, seeded_generator(seed, "random-mask", level_key(target))),
        }
        return {m: {k: v.to(self.device) for k, v in candidates[m].items()} for m in self.config.methods}

    def sparse(self, seed: int, k: int, target: float, method: str, masks: Mapping[str, Tensor]) -> dict[str, Any]:
        """Sparse-train ``method`` of ``seed`` from rewind point ``k`` at ``target``
        (LTH from A_k, the others from B_k of the same seed)."""
        start = f"seed{seed}-{'A' if method == 'lth' else 'B'}"
        ref = self.ref_sparse(seed, k, target, method)
        return self.train_sparse(
            ref, start, seed, k, target, masks, order=method, identity={"seed": seed, "method": method}
        )

    def shared_sparse(self, seed: int, k: int, target: float, method: str) -> dict[str, Any]:
        """Member ``seed`` of ``method`` in the shared-mask protocol: LTH
        from A_0,k with m_{A_0}, naive from B_s,k with m_{A_0}, permuted from
        B_s,k with pi'_s(m_{A_0}), each trained with the data order of the
        seed-``seed`` run of ``method``. Member 0 is therefore the seed-0 run
        of stage ``sparse`` itself (same start, mask and data order); the
        others are stage ``shared-sparse``."""
        if seed == 0:
            return self.sparse(0, k, target, method, self.method_masks(0, target, self.match(0)[1])[method])
        masks = self.method_masks(0, target, self.shared_match(seed)[1])[method]
        start = "seed0-A" if method == "lth" else f"seed{seed}-B"
        ref = self.ref_sparse(seed, k, target, method, shared=True)
        return self.train_sparse(
            ref, start, seed, k, target, masks, order=method, identity={"seed": seed, "method": method}
        )

    def shared_model(self, seed: int, k: int, target: float, method: str) -> nn.Module:
        """The trained member ``seed`` of ``method`` in the shared-mask protocol."""
        return self.sparse_model(seed, k, target, method, stage="sparse" if seed == 0 else "shared-sparse")

    def train_sparse(
        self,
        ref: StageRef,
        start: str,
        seed: int,
        k: int,
        target: float,
        masks: Mapping[str, Tensor],
        *,
        order: str,
        identity: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Stage instance ``ref``: the rewind checkpoint k of dense stage
        ``start`` trained under ``masks`` for T - k epochs at ``sparse_lr``
        with the data order of the sparse run (``seed``, k, ``target``,
        ``order``: a method), saved as ``model.pt``. Its record: ``identity``
        (which run this is), ``k``, ``sparsity``, the test scores and
        ``mask_sparsity``."""
        record = self.finished(ref)
        if record is not None:
            return record
        with self.stage(ref):
            distributed.assert_same_on_ranks(distributed.tensor_digest(masks), f"The mask of {ref.stage}/{ref.key}")
            model = self.load_model("dense", start, f"rewind_k{k}.pt")
            train(
                model,
                self.data.train,
                self.train_config(self.config.epochs - k, self.config.sparse_lr),
                generator=seeded_generator(seed, "sparse", k, level_key(target), order),
                masks=masks,
                distributed=True,
            )
            self.store.save_tensors(ref.stage, ref.key, "model.pt", cpu_state(model))
            data = {
                **identity,
                "k": k,
                "sparsity": target,
                **self.data.scores(model),
                "mask_sparsity": sparsity(masks).global_,
            }
            record = self.store.finish(ref.stage, ref.key, ref.settings, data)
        return record

    def sparse_model(self, seed: int, k: int, target: float, method: str, stage: str = "sparse") -> nn.Module:
        """The trained sparse model of a ``sparse`` (or ``shared-sparse``) stage."""
        return self.load_model(stage, sparse_key(seed, k, target, method), "model.pt")

    def lmc(self, seed: int, perm: Permutation) -> list[dict[str, Any]]:
        """LMC curves of ``seed``: A-B before and after matching, and between
        the sparse solutions at every (k, sparsity)."""
        ref = self.ref_lmc(seed)
        record = self.finished(ref)
        if record is not None:
            return record["curves"]
        with self.stage(ref):
            curves = self._lmc_curves(seed, perm) if distributed.is_main() else None
            record = self.store.finish("lmc", ref.key, ref.settings, None if curves is None else {"curves": curves})
        return record["curves"]

    def _lmc_curves(self, seed: int, perm: Permutation) -> list[dict[str, Any]]:
        """The curves of :meth:`lmc` (rank 0 alone computes them)."""
        c = self.config
        bn_data = None
        if self.has_bn():
            bn_data = self.data.bn_batches(c.bn_batches, c.batch_size)

        def curve(pair: str, a: nn.Module, b: nn.Module, k: int | None, target: float | None, **masks: Any) -> dict:
            result: LMCResult = lmc_barrier(
                a, b, self.data.test_batches(), num_points=c.barrier_points, bn_data=bn_data, **masks
            )
            return {
                "seed": seed,
                "pair": pair,
                "k": k,
                "sparsity": target,
                "alphas": result.alphas,
                "losses": result.losses,
                "errors": result.errors,
                "barrier": result.barrier,
                "error_barrier": result.error_barrier,
            }

        model_a = self.load_model("dense", f"seed{seed}-A", "final.pt")
        model_b = self.load_model("dense", f"seed{seed}-B", "final.pt")
        curves = [
            curve("A-B", model_a, model_b, None, None),
            curve("pi(A)-B", apply_permutation(model_a, perm), model_b, None, None),
        ]
        for target in c.sparsities:
            masks = self.method_masks(seed, target, perm)
            for k in c.rewind_epochs:
                models = {m: self.sparse_model(seed, k, target, m) for m in c.methods if m != "random"}
                for label, a, b, align in _SPARSE_PAIRS:
                    if a in models and b in models:
                        curves.append(
                            curve(
                                label,
                                apply_permutation(models[a], perm) if align else models[a],
                                models[b],
                                k,
                                target,
                                masks_a=masks["permuted"] if align else masks[a],
                                masks_b=masks[b],
                            )
                        )
        return curves

    @torch.no_grad()
    def log_probs(self, model: nn.Module) -> Tensor:
        """``(N_test, C)`` float64 log-probabilities of ``model`` on the test set."""
        model.eval()
        out = [torch.log_softmax(model(x).double(), dim=1).cpu() for x, _ in self.data.test_batches()]
        return torch.cat(out)

    def diversity(self) -> list[dict[str, Any]]:
        """Diversity of every solution over seeds, pairwise and against A_T."""
        ref = self.ref_diversity()
        record = self.finished(ref)
        if record is not None:
            return record["rows"]
        with self.stage(ref):
            rows = self._diversity_all() if distributed.is_main() else None
            record = self.store.finish("diversity", "all", ref.settings, None if rows is None else {"rows": rows})
        return record["rows"]

    def _diversity_all(self) -> list[dict[str, Any]]:
        """The rows of :meth:`diversity` (rank 0 alone computes them)."""
        c = self.config
        seeds = range(c.seeds)
        dense_a = [self.log_probs(self.load_model("dense", f"seed{s}-A", "final.pt")) for s in seeds]
        dense_b = [self.log_probs(self.load_model("dense", f"seed{s}-B", "final.pt")) for s in seeds]
        rows = [*self._diversity_rows("dense", None, None, dense_a, dense_b, dense_a)]
        for target in c.sparsities:
            imp = [self.log_probs(self.imp_model(s, target)) for s in seeds]
            rows += self._diversity_rows("imp", None, target, imp, imp, dense_a)
            for k in c.rewind_epochs:
                for method in c.methods:
                    members = [self.log_probs(self.sparse_model(s, k, target, method)) for s in seeds]
                    rows += self._diversity_rows(method, k, target, members, members, dense_a)
        return rows

    def imp_model(self, seed: int, target: float) -> nn.Module:
        """The pruned IMP solution of ``seed`` at ``target``."""
        saved = self.store.load_tensors("imp", f"seed{seed}", f"target_{level_key(target)}.pt")
        return self.from_state(saved["state"])

    def shared_mask(self) -> dict[str, Any] | None:
        """The shared-mask protocol of the ICML paper's Table 1 (Sec. 4.2,
        after Evci et al. 2022) at one (sparsity, k) (:meth:`ReproduceConfig.table1_level`):
        matchings pi'_s (A_0 -> B_s), the members of LTH / naive / permuted
        (:meth:`shared_sparse`) and their diversity; ``None`` with one seed
        (an ensemble needs two members).

        Returns:
            ``{"protocol", "sparsity", "k", "matching", "sparse", "diversity"}``:
            the ``shared-match`` records (s >= 1; none without ``permuted``), every member's sparse
            record (member s = its ``seed``) and :meth:`shared_diversity`'s rows.
        """
        c = self.config
        if c.seeds < 2:
            return None
        target, k = c.table1_level()
        methods = tuple(m for m in SHARED_MASK_METHODS if m in c.methods)
        seeds = range(c.seeds)
        matching = [self.shared_match(s)[0] for s in seeds if s > 0] if "permuted" in methods else []
        sparse = [self.shared_sparse(s, k, target, m) for m in methods for s in seeds]
        return {
            "protocol": SHARED_MASK,
            "sparsity": target,
            "k": k,
            "matching": matching,
            "sparse": sparse,
            "diversity": self.shared_diversity(target, k, methods),
        }

    def shared_diversity(self, target: float, k: int, methods: Sequence[str]) -> list[dict[str, Any]]:
        """Pairwise diversity of the shared-mask protocol's ensembles (ICML
        Table 1): dense (A_s,T) and IMP (of each A_s) over independent seeds,
        then the members of each of ``methods`` at (``target``, k). Each row:
        :meth:`~maskalign.metrics.DiversityReport.to_dict` plus ``protocol``,
        ``method``, ``k``, ``sparsity`` and ``member_accuracies`` (in seed order)."""
        ref = self.ref_shared_diversity(target, k)
        record = self.finished(ref)
        if record is not None:
            return record["rows"]
        with self.stage(ref):
            rows = self._shared_rows(target, k, methods) if distributed.is_main() else None
            data = None if rows is None else {"rows": rows}
            record = self.store.finish("shared-diversity", ref.key, ref.settings, data)
        return record["rows"]

    def _shared_rows(self, target: float, k: int, methods: Sequence[str]) -> list[dict[str, Any]]:
        """The rows of :meth:`shared_diversity` (rank 0 alone computes them)."""
        ensembles: list[tuple[str, int | None, float | None, Callable[[int], nn.Module]]] = [
            ("dense", None, None, lambda s: self.load_model("dense", f"seed{s}-A", "final.pt")),
            ("imp", None, target, lambda s: self.imp_model(s, target)),
        ]
        ensembles += [
            (m, k, target, functools.partial(self.shared_model, k=k, target=target, method=m)) for m in methods
        ]
        rows = []
        for method, kk, level, load in ensembles:
            members = [self.log_probs(load(s)) for s in range(self.config.seeds)]
            report = diversity(members, self.targets).to_dict()
            accuracies = [ensemble_accuracy([m], self.targets) for m in members]
            base = {"protocol": SHARED_MASK, "method": method, "k": kk, "sparsity": level}
            rows.append({**base, **report, "member_accuracies": accuracies})
        return rows

    def _diversity_rows(
        self,
        method: str,
        k: int | None,
        target: float | None,
        pairwise_members: list[Tensor],
        reference_members: list[Tensor],
        references: list[Tensor],
    ) -> list[dict[str, Any]]:
        """A ``pairwise`` row (needs 2+ seeds) and a ``reference`` row (each
        seed's member against that seed's reference, averaged over seeds;
        ensemble accuracy is not defined there: None)."""
        base = {"method": method, "k": k, "sparsity": target}
        rows = []
        if len(pairwise_members) >= 2:
            report = diversity(pairwise_members, self.targets).to_dict()
            rows.append({**base, **report, "reference": None})
        per_seed = [diversity([m], self.targets, reference=r) for m, r in zip(reference_members, references)]
        n = len(per_seed)
        rows.append(
            {
                **base,
                "mode": "reference",
                "reference": _REFERENCE,
                "disagreement": sum(r.disagreement for r in per_seed) / n,
                "kl": sum(r.kl for r in per_seed) / n,
                "js": sum(r.js for r in per_seed) / n,
                "ensemble_accuracy": None,
                "member_accuracy": sum(r.member_accuracy for r in per_seed) / n,
                "members": n,
            }
        )
        return rows

    # ---------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        c = self.config
        results: dict[str, Any] = {
            "dense": [],
            "imp": [],
            "imp_history": [],
            "matching": [],
            "sparse": [],
            "lmc": [],
            "variants": {"matching": [], "sparse": []},
        }
        for seed in range(c.seeds):
            for role in ("A", "B"):
                results["dense"].append(self.dense(seed, role))
            imp_record = self.imp(seed)
            results["imp"] += imp_record["targets"]
            results["imp_history"] += [{"seed": seed, **h} for h in imp_record["history"]]
            match_record, perm = self.match(seed)
            results["matching"].append(match_record)
            for target in c.sparsities:
                masks = self.method_masks(seed, target, perm)
                for k in c.rewind_epochs:
                    for method in c.methods:
                        results["sparse"].append(self.sparse(seed, k, target, method, masks[method]))
            for part, rows in self.studies.run_seed(seed, perm).items():
                results["variants"][part] += rows
            results["lmc"] += self.lmc(seed, perm)
        results["diversity"] = self.diversity()
        results["shared_mask"] = self.shared_mask()
        results["variants"]["ensembles"] = self.studies.ensembles()
        return results

    def plan(self) -> Iterator[StageRef]:
        """Every stage instance of :meth:`run`, in the order :meth:`run`
        reaches them, each once, computing and loading nothing (the seed-0
        members of the shared-mask protocol are the ``sparse`` stages
        already listed). The instances come from the same ``ref_*`` methods
        as the stages' own; the tests check that a finished run reuses every
        planned stage."""
        c = self.config
        for seed in range(c.seeds):
            yield from (self.ref_dense(seed, role) for role in ("A", "B"))
            yield self.ref_imp(seed)
            yield self.ref_match(seed)
            for target, k, method in itertools.product(c.sparsities, c.rewind_epochs, c.methods):
                yield self.ref_sparse(seed, k, target, method)
            yield from self.studies.plan(seed)
            yield self.ref_lmc(seed)
        yield self.ref_diversity()
        if c.seeds < 2:
            return
        target, k = c.table1_level()
        methods = tuple(m for m in SHARED_MASK_METHODS if m in c.methods)
        if "permuted" in methods:
            yield from (self.ref_shared_match(seed) for seed in range(1, c.seeds))
        for method, seed in itertools.product(methods, range(1, c.seeds)):
            yield self.ref_sparse(seed, k, target, method, shared=True)
        yield self.ref_shared_diversity(target, k)
        yield from self.studies.plan_ensembles()

    def plan_status(self) -> list[dict[str, Any]]:
        """:meth:`plan` with what the run would do with each instance (the
        rows of :func:`plan_stages`)."""
        rows = []
        for ref in self.plan():
            status, reason = "compute", None
            try:
                if self.store.lookup(ref.stage, ref.key, ref.settings) is not None:
                    status = "reuse"
            except StageMismatchError as exc:
                status, reason = "changed", exc
            rows.append({"stage": ref.stage, "key": ref.key, "words": ref.words, "status": status, "reason": reason})
        return rows


def _run_device(config: ReproduceConfig) -> torch.device:
    """The device of a run (:func:`resolve_device`; under a process group,
    this rank's: :func:`~maskalign.repro.distributed.rank_device`), checked
    against ``amp``."""
    device = distributed.rank_device(resolve_device(config.device))
    if config.amp != "off" and device.type != "cuda":
        raise ConfigError(
            f"Setting 'amp' (--amp) is {config.amp!r}, which needs CUDA, but the run uses {device}; "
            "pass --amp off or a CUDA device."
        )
    return device


def reproduce(
    config: ReproduceConfig | None = None,
    *,
    out: str | Path | None = None,
    splits: DatasetSplits | None = None,
    preset: str | None = None,
    force: bool = False,
    restart: bool = False,
    log: Callable[[str], None] | None = None,
    on_stage_end: Callable[[str, str], None] | None = None,
    observer: StageObserver | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment; returns the JSON-ready results.

    Args:
        config: every setting (see :mod:`maskalign.repro.presets`); default: the
            ``digits`` preset.
        out: output folder holding the stages (``out/stages``) and
            ``config.json`` (the resolved settings, written first); a
            temporary folder (deleted afterwards) when ``None``.
        splits: the data; loaded from ``config.dataset``/``data_root`` when
            ``None`` (``"imagenet"``: the ImageFolder at ``data_root``, streamed).
        preset: name of the preset ``config`` came from, recorded in the results.
        force: recompute stages whose settings differ from the stored ones
            instead of raising.
        restart: discard every stored stage first.
        log: receives one line per computed stage (and IMP round).
        on_stage_end: ``on_stage_end(stage, key)`` after each computed stage
            (one of :data:`STAGES`) and after each IMP round's checkpoint
            (``"imp-round"``, ``"seed<s>/round<i>"``).
        observer: told the plan at the start and every stage reused, begun
            and computed (:class:`~maskalign.repro.progress.StageObserver`;
            the command line's progress display is
            :class:`~maskalign.repro.progress.RunProgress`).

    Returns:
        ``{"config", "preset", "device", "world_size", "data_fingerprint", "imp_schedule",
        "dense", "imp", "imp_history", "matching", "sparse", "lmc",
        "diversity", "shared_mask", "timing"}``; ``shared_mask`` is the
        Table-1 protocol (``_Run.shared_mask``; ``None`` with one seed);
        accuracies are fractions, losses mean cross-entropy (nats),
        diversity divergences in nats.

    Raises:
        StageMismatchError: a stored stage was computed with other settings.
        ArgumentTypeError: ``config`` is not a :class:`ReproduceConfig`.
        ConfigError: (a ``ValueError``) as :func:`resolve_device`, or
            ``amp`` without CUDA; under a process group: ``out`` is
            ``None``, or ``sync_bn`` with BatchNorm off CUDA; ImageNet:
            ``batch_size`` not a multiple of the number of ranks.
        DataError, ValueError: as :func:`~maskalign.repro.data.load_dataset`
            (ImageNet: as :func:`~maskalign.repro.imagenet.load_imagefolder`,
            or no ``data_root``).
        MissingDependencyError: (an ``ImportError``) ImageNet without torchvision.

    Distributed: under an initialised ``torch.distributed`` process group
    (``torchrun``; see :mod:`maskalign.repro.distributed`), every rank calls
    :func:`reproduce` with the same arguments and ``out`` a folder they all
    read; only rank 0 writes there, and every rank returns rank 0's results
    (``world_size`` says how many ranks trained). ``log``, ``on_stage_end``
    and ``observer`` are called on the ranks that are given them (the
    command line gives them to rank 0 only).
    """
    if config is not None and not isinstance(config, ReproduceConfig):
        raise ArgumentTypeError(
            f"Argument 'config' is {_describe(config)}, not a ReproduceConfig; pass get_preset(name, **overrides) "
            "or ReproduceConfig(...)."
        )
    began = time.perf_counter()
    config = config or PRESETS["digits"]
    device = _run_device(config)
    world = distributed.world_size()
    if world > 1 and out is None:
        raise ConfigError(
            "Argument 'out' is None under torch.distributed, which would give each rank its own temporary "
            "folder; pass a folder that every rank can read."
        )
    data = load_run_data(config, splits, device, world)
    fingerprint = data.fingerprint
    threads, benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick the fastest kernels
    try:
        with tempfile.TemporaryDirectory(prefix="maskalign-") if out is None else nullcontext(out) as folder:
            store = StageStore(Path(folder), force=force)
            run = _Run(config, data, device, store, fingerprint, log or (lambda _: None), on_stage_end, observer, world)
            if world > 1 and config.sync_bn and device.type != "cuda" and run.has_bn():
                raise ConfigError(
                    f"Setting 'sync_bn' (--sync-bn) is on for a model with BatchNorm on {device}, but "
                    "torch's SyncBatchNorm runs on CUDA only; pass --no-sync-bn (each rank then normalises "
                    "over its own share of the batch) or run on GPUs."
                )
            if restart:
                store.clear()
            settings = {"preset": preset, "config": config.to_dict(), "device": str(device), "world_size": world}
            if distributed.is_main():
                atomic_write(Path(folder) / "config.json", lambda h: json.dump(settings, h, indent=1))
            if observer is not None:
                observer.start(run.plan_status())
            body = run.run()
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
    return {
        "config": config.to_dict(),
        "preset": preset,
        "device": str(device),
        "world_size": world,
        "data_fingerprint": fingerprint,
        "imp_schedule": imp_schedule(config.sparsities, config.prune_rate),
        **body,
        "timing": {"elapsed_s": time.perf_counter() - began},
    }


def plan_stages(
    config: ReproduceConfig | None = None,
    *,
    out: str | Path,
    splits: DatasetSplits | None = None,
) -> list[dict[str, Any]]:
    """What :func:`reproduce` would do in ``out``, without doing it: every
    stage instance in run order (:meth:`_Run.plan`) and whether the run
    would reuse or compute it. Reads the output folder and the data (for its
    fingerprint); writes and trains nothing, and creates no folder. Under
    ``torchrun`` (``WORLD_SIZE`` set; no process group is needed), the
    stages of a run on that many processes.

    Args:
        config: as :func:`reproduce`.
        out: the output folder (need not exist).
        splits: as :func:`reproduce`.

    Returns:
        One ``{"stage", "key", "words", "status", "reason"}`` per stage
        instance (``words``: its name in words, e.g. ``sparse seed 2 / k=5 /
        99% / permuted``);
        ``status`` is ``"reuse"`` (finished with the same settings),
        ``"compute"`` (not finished) or ``"changed"`` (finished with other
        settings: recomputed with ``force``, else :func:`reproduce` raises
        there); ``reason`` is the :class:`StageMismatchError` of a changed
        stage (naming each differing setting), else ``None``.

    Raises:
        ArgumentTypeError: ``config`` is not a :class:`ReproduceConfig`.
        ConfigError: (a ``ValueError``) as :func:`reproduce`.
        DataError, ValueError: as :func:`~maskalign.repro.data.load_dataset`.
    """
    if config is not None and not isinstance(config, ReproduceConfig):
        raise ArgumentTypeError(
            f"Argument 'config' is {_describe(config)}, not a ReproduceConfig; pass get_preset(name, **overrides) "
            "or ReproduceConfig(...)."
        )
    config = config or PRESETS["digits"]
    device = _run_device(config)  # the checks of a real run; the plan itself needs no device
    world = distributed.env_world_size()  # a dry run under torchrun: the stages of a run with that many ranks
    # the ImageFolder's settings depend on the run's device (loader workers); in-memory data stays on the CPU
    data = load_run_data(
        config, splits, device if splits is None and config.dataset == "imagenet" else torch.device("cpu"), world
    )
    store = StageStore(Path(out))
    run = _Run(config, data, torch.device("cpu"), store, data.fingerprint, lambda _: None, None, world=world)
    return run.plan_status()
