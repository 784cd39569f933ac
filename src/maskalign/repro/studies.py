"""Studies beyond the paper: where the permutation that carries A's mask to B
comes from, and what it costs.

The paper finds its permutation pi by activation matching of dense A_T to
dense B_T on all the training data (stage ``match``), which needs B trained
to convergence: as costly as training A. Its conclusion asks for cheaper and
better alignment (ICML 2025, Sec. 6). Each *variant* here is another way of
finding the permutation, pi_v:

* early matching (``match_epochs``): for each e, ``e<e>/AT-Be``: A_T -> B_e,
  B trained only the first e epochs of its T-epoch schedule (same learning
  rates and data order as dense B; e = k means no training of B beyond the
  rewind point), and ``e<e>/Ae-Be``: A_e -> B_e;
* matching sources (``match_sources``): ``subset`` (A_T -> B_T on
  ``subset_samples`` training samples: the paper matched ImageNet on "a
  small subset" and names it as a cause of the remaining gap), ``imp``
  (A's pruned IMP solution at the target sparsity -> B_T) and
  ``mask-aware`` (A_T -> B_T, each of A's units weighted by the surviving
  mass of m_A: ``mask=`` of :func:`~maskalign.match_activations`).

Each pi_v is evaluated per seed as the paper's pi is: its agreement with pi
(the fraction of hidden units that both map to the same unit of B), the LMC
loss barrier (nats) between pi_v(A_T) and B_T (and, for early matching,
between pi_v(A_T) and B_e), and the test accuracy of sparse training from
B_k with pi_v(m_A) for T - k epochs at the shared-mask rewind point k
(:meth:`~maskalign.repro.presets.ReproduceConfig.table1_level`) and every
sparsity (``imp`` and ``mask-aware``: their own sparsity). The sparse runs
use the data order of the paper's permuted run at the same (k, sparsity),
so the permutation is the only difference. ``epochs_saved`` counts the
dense epochs of B not trained: T - max(e, k) (B must reach B_k anyway).

Permuted ensembles with early matching (the talk's question "can we
efficiently create ensembles using permutations of sparse masks?"): with 2+
seeds, for each e of ``match_epochs``, an ensemble in the shared-mask
protocol (one pruned A_0, one mask m_A0) whose member s is B_s,k with
pi'_s,e(m_A0), pi'_s,e the matching A_0,T -> B_s,e: the paper's permuted
ensemble, whose every B_s must be trained to B_T for its matching, at the
cost of B_s trained to max(e, k) only. Member 0 is the seed-0 ``e<e>/AT-Be``
run above; the others are ``variant-match`` / ``variant-sparse`` instances
``A0-B<s>/e<e>/AT-Be``, each trained with the data order of the paper's
permuted member s; ``variant-diversity`` gives their pairwise diversity and
ensemble accuracy next to the shared-mask protocol's ensembles
(``results["variants"]["ensembles"]``).

Stages: ``early-dense`` (A_e or B_e when e is not a rewind point: the
dense run's rewind checkpoint is that state otherwise), ``variant-match``
(the permutation, its agreement and barriers), ``variant-sparse`` and
``variant-diversity``; the rows go to ``results["variants"]`` and the
report's early-matching, matching-source and ensemble tables
(:mod:`maskalign.repro.study_report`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..evaluation.lmc import lmc_barrier
from ..evaluation.metrics import diversity, ensemble_accuracy
from ..matching.activation import match_activations
from ..permutation import Permutation, apply_permutation, permute_mask
from ..spec.permutation_spec import PermutationSpec
from . import distributed
from .presets import ReproduceConfig
from .progress import percent
from .refs import (
    DENSE,
    DIVERSITY,
    IMP,
    MATCH,
    RECIPE,
    SPARSE,
    StageRef,
    cpu_state,
    derive_seed,
    level_key,
    seeded_generator,
)
from .rundata import RunData
from .stages import StageStore
from .training import TrainConfig, train

__all__ = ["EARLY_PAIRS", "STUDY_STAGES", "Studies", "StudyRun", "Variant", "permutation_agreement", "variants"]

#: The stages of the studies, in the order they run (after a seed's ``sparse``).
STUDY_STAGES: tuple[str, ...] = ("early-dense", "variant-match", "variant-sparse", "variant-diversity")

#: The two early-matching pairs: A_T -> B_e and A_e -> B_e.
EARLY_PAIRS: tuple[str, ...] = ("AT-Be", "Ae-Be")

# What a variant's barriers add to the settings of its permutation.
_BARRIER = ("barrier_points", "bn_batches")


@dataclass(frozen=True)
class Variant:
    """One way of finding the permutation (see the module docstring).

    Attributes:
        name: its key, e.g. ``e2/AT-Be``, ``subset``, ``imp/s0.9``.
        family: ``"early"`` or ``"source"``.
        epoch: e, the epochs B (and A, for ``Ae-Be``) were trained (early only).
        pair: ``"AT-Be"`` or ``"Ae-Be"`` (early only).
        source: ``"subset"``, ``"imp"`` or ``"mask-aware"`` (sources only).
        sparsity: the sparsity whose A (``imp``) or mask (``mask-aware``) it
            matches with; ``None``: one permutation for every sparsity.
    """

    name: str
    family: str
    epoch: int | None = None
    pair: str | None = None
    source: str | None = None
    sparsity: float | None = None

    def targets(self, config: ReproduceConfig) -> tuple[float, ...]:
        """The sparsities its permuted mask is trained at."""
        return config.sparsities if self.sparsity is None else (self.sparsity,)

    def words(self) -> str:
        """Its name in words, for the progress display."""
        if self.family == "early":
            a = "A_T" if self.pair == "AT-Be" else f"A_{self.epoch}"
            return f"{a} -> B_{self.epoch}"
        if self.sparsity is None:
            return str(self.source)
        return f"{self.source} at {percent(self.sparsity)}"


def variants(config: ReproduceConfig) -> list[Variant]:
    """The variants of ``config`` (``match_epochs``, ``match_sources``), in run order."""
    out = [Variant(f"e{e}/{pair}", "early", epoch=e, pair=pair) for e in config.match_epochs for pair in EARLY_PAIRS]
    for source in config.match_sources:
        if source == "subset":
            out.append(Variant("subset", "source", source="subset"))
        else:
            out += [
                Variant(f"{source}/s{level_key(s)}", "source", source=source, sparsity=s) for s in config.sparsities
            ]
    return out


def permutation_agreement(perm: Permutation, reference: Permutation) -> float:
    """The fraction of hidden units (over every group of the spec, each unit
    once) that ``perm`` and ``reference`` map to the same unit: 1.0 for equal
    permutations, about 1 / n for unrelated ones of n units."""
    same = total = 0
    for group in reference:
        same += int((perm[group] == reference[group]).sum())
        total += reference[group].numel()
    return same / max(total, 1)


class StudyRun(Protocol):
    """What the studies use of the run that owns them
    (``maskalign.repro.experiment._Run``): its settings, store, data and
    model helpers, the paper's cross-seed matching ``shared_match`` and its
    sparse training ``train_sparse``."""

    config: ReproduceConfig
    store: StageStore
    data: RunData
    device: torch.device
    targets: Tensor

    def settings(self, fields: Sequence[str], **instance: object) -> dict[str, Any]: ...

    def finished(self, ref: StageRef) -> dict[str, Any] | None: ...

    def stage(self, ref: StageRef) -> AbstractContextManager[None]: ...

    def train_config(self, epochs: int, lr: float) -> TrainConfig: ...

    def build(self) -> nn.Module: ...

    def to_device(self, model: nn.Module) -> nn.Module: ...

    def load_model(self, stage: str, key: str, name: str) -> nn.Module: ...

    def spec(self, model: nn.Module) -> PermutationSpec: ...

    def has_bn(self) -> bool: ...

    def imp_model(self, seed: int, target: float) -> nn.Module: ...

    def log_probs(self, model: nn.Module) -> Tensor: ...

    def shared_match(self, seed: int) -> tuple[dict[str, Any], Permutation]: ...

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
    ) -> dict[str, Any]: ...


class Studies:
    """The studies of one :func:`~maskalign.repro.experiment.reproduce` run:
    the stage instances of each seed (:meth:`plan`) and the rows they give
    (:meth:`run_seed`). Reads and writes through the run's store, data and
    settings, like the run's own stages."""

    def __init__(self, run: StudyRun) -> None:
        self.run = run
        self.config = run.config
        self.variants = variants(run.config)
        self.k = run.config.table1_level()[1]

    # ------------------------------------------------------------ refs
    def _early_epochs(self) -> list[int]:
        """The e that need an ``early-dense`` stage (not a rewind point)."""
        return [e for e in self.config.match_epochs if e not in self.config.rewind_epochs]

    def ref_early_dense(self, seed: int, role: str, epoch: int) -> StageRef:
        settings = self.run.settings(DENSE, seed=seed, role=role, epoch=epoch)
        return StageRef(
            "early-dense", f"seed{seed}-{role}/e{epoch}", settings, f"early-dense seed {seed} / {role}_{epoch}"
        )

    @staticmethod
    def _perm_fields(variant: Variant) -> tuple[str, ...]:
        """The settings pi_v depends on."""
        if variant.source == "subset":
            return (*MATCH, "subset_samples")
        if variant.family == "source":  # imp, mask-aware: A's IMP solution or mask
            return (*IMP, *RECIPE)
        return MATCH

    @staticmethod
    def _prefix(seed: int, shared: bool) -> tuple[str, dict[str, int]]:
        """The key prefix and extra settings of an instance: ``seed<s>``, or
        ``A0-B<s>`` (with ``mask_seed=0``) for an ensemble member."""
        return (f"A0-B{seed}", {"mask_seed": 0}) if shared else (f"seed{seed}", {})

    def ref_match(self, seed: int, variant: Variant, *, shared: bool = False) -> StageRef:
        fields = (*self._perm_fields(variant), *_BARRIER)
        prefix, extra = self._prefix(seed, shared)
        settings = self.run.settings(fields, seed=seed, variant=variant.name, **extra)
        a = "A seed 0 / B " if shared else ""
        return StageRef(
            "variant-match", f"{prefix}/{variant.name}", settings, f"match {a}seed {seed} / {variant.words()}"
        )

    def ref_sparse(self, seed: int, variant: Variant, target: float, *, shared: bool = False) -> StageRef:
        fields = tuple(dict.fromkeys((*SPARSE, *self._perm_fields(variant))))
        prefix, extra = self._prefix(seed, shared)
        settings = self.run.settings(fields, seed=seed, variant=variant.name, k=self.k, sparsity=target, **extra)
        key = f"{prefix}/{variant.name}/k{self.k}/s{level_key(target)}"
        who = f"A0-B{seed}" if shared else f"seed {seed}"
        words = f"sparse {who} / k={self.k} / {percent(target)} / permuted by {variant.words()}"
        return StageRef("variant-sparse", key, settings, words)

    def ensemble_variants(self) -> list[Variant]:
        """The early-matching variants that also get a permuted ensemble
        (``A_T -> B_e``, each e; none with one seed or without ``permuted``)."""
        if self.config.seeds < 2 or "permuted" not in self.config.methods:
            return []
        return [v for v in self.variants if v.pair == "AT-Be"]

    def ref_diversity(self) -> StageRef:
        target, k = self.config.table1_level()
        fields = (*DIVERSITY, "match_epochs")
        settings = self.run.settings(fields, k=k, sparsity=target, mask_seed=0)
        return StageRef(
            "variant-diversity", f"k{k}/s{level_key(target)}", settings, f"variant-diversity k={k} / {percent(target)}"
        )

    def plan(self, seed: int) -> Iterator[StageRef]:
        """The stage instances of :meth:`run_seed`, in its order."""
        if not self.variants:
            return
        for epoch in self._early_epochs():
            yield from (self.ref_early_dense(seed, role, epoch) for role in ("B", "A"))
        for variant in self.variants:
            yield self.ref_match(seed, variant)
            yield from (self.ref_sparse(seed, variant, t) for t in variant.targets(self.config))

    def plan_ensembles(self) -> Iterator[StageRef]:
        """The stage instances of :meth:`ensembles`, in its order (member 0
        is the seed-0 ``variant-sparse`` run, already planned)."""
        ensembles = self.ensemble_variants()
        if not ensembles:
            return
        target = self.config.table1_level()[0]
        for variant in ensembles:
            for seed in range(1, self.config.seeds):
                yield self.ref_match(seed, variant, shared=True)
                yield self.ref_sparse(seed, variant, target, shared=True)
        yield self.ref_diversity()

    # ---------------------------------------------------------- models
    def dense_at(self, seed: int, role: str, epoch: int) -> nn.Module:
        """Dense ``role`` of ``seed`` after ``epoch`` epochs of its T-epoch
        schedule: the rewind checkpoint when there is one, else stage
        ``early-dense`` (trained again from the same initialisation with the
        same data order, stopped after ``epoch`` epochs)."""
        run = self.run
        if epoch in self.config.rewind_epochs:
            return run.load_model("dense", f"seed{seed}-{role}", f"rewind_k{epoch}.pt")
        ref = self.ref_early_dense(seed, role, epoch)
        if run.finished(ref) is None:
            with run.stage(ref):
                torch.manual_seed(derive_seed(seed, "dense", role, "init"))  # dense()'s initialisation
                model = run.to_device(run.build())
                train(
                    model,
                    run.data.train,
                    run.train_config(self.config.epochs, self.config.lr),
                    generator=seeded_generator(seed, "dense", role, "data"),
                    distributed=True,
                    stop_after=epoch,
                )
                run.store.save_tensors("early-dense", ref.key, "model.pt", cpu_state(model))
                record = {"seed": seed, "model": role, "epoch": epoch, **run.data.scores(model)}
                run.store.finish("early-dense", ref.key, ref.settings, record)
        return run.load_model("early-dense", ref.key, "model.pt")

    def _imp_masks(self, seed: int, target: float) -> dict[str, Tensor]:
        return self.run.store.load_tensors("imp", f"seed{seed}", f"target_{level_key(target)}.pt")["masks"]

    # ---------------------------------------------------------- stages
    def _permutation(self, seed: int, variant: Variant, seed_a: int) -> Permutation:
        """pi_v from A of ``seed_a`` to B of ``seed`` (all ranks match their
        share; rank 0's result is checked on every rank)."""
        run, c = self.run, self.config
        a_final = run.load_model("dense", f"seed{seed_a}-A", "final.pt")
        options: dict[str, Any] = {}
        data = run.data.match_batches()
        if variant.epoch is not None:  # early matching
            model_a = a_final if variant.pair == "AT-Be" else self.dense_at(seed_a, "A", variant.epoch)
            model_b = self.dense_at(seed, "B", variant.epoch)
        else:
            model_b = run.load_model("dense", f"seed{seed}-B", "final.pt")
            model_a = a_final
            if variant.source == "subset":
                data = run.data.match_batches(samples=c.subset_samples)
            elif variant.source == "imp" and variant.sparsity is not None:
                model_a = run.imp_model(seed_a, variant.sparsity)
            elif variant.sparsity is not None:  # mask-aware
                masks = self._imp_masks(seed_a, variant.sparsity)
                options["mask"] = {k: v.to(run.device) for k, v in masks.items()}
        perm = match_activations(
            model_a,
            model_b,
            data,
            run.spec(a_final),
            points=c.match_points,
            stream_points=c.match_stream_points,
            progress=False,
            **options,
        )
        digest = distributed.tensor_digest({g: perm[g] for g in perm})
        distributed.assert_same_on_ranks(digest, f"The permutation of variant-match/{seed_a}->{seed}/{variant.name}")
        return perm

    def match(
        self, seed: int, variant: Variant, paper: Permutation, *, shared: bool = False
    ) -> tuple[dict[str, Any], Permutation]:
        """Stage ``variant-match``: pi_v (A and B of ``seed``; ``shared``: A
        of seed 0), its agreement with the paper's permutation between the
        same models (``paper``) and its barriers; the permutation in
        ``perm.pt``."""
        run = self.run
        seed_a = 0 if shared else seed
        ref = self.ref_match(seed, variant, shared=shared)
        spec = run.spec(run.load_model("dense", f"seed{seed_a}-A", "final.pt"))
        record = run.finished(ref)
        if record is None:
            with run.stage(ref):
                perm = self._permutation(seed, variant, seed_a)
                data = None
                if distributed.is_main():
                    perm.save(run.store.path("variant-match", ref.key, "perm.pt"))
                    identity = {**self._identity(seed, variant), **({"seed_a": 0} if shared else {})}
                    data = {**identity, **self._barriers(seed, variant, perm, paper, seed_a)}
                record = run.store.finish("variant-match", ref.key, ref.settings, data)
        return record, Permutation.load(run.store.path("variant-match", ref.key, "perm.pt"), spec)

    def _identity(self, seed: int, variant: Variant) -> dict[str, Any]:
        c = self.config
        epoch = variant.epoch
        saved = None if epoch is None else c.epochs - max(epoch, self.k)
        return {
            "seed": seed,
            "variant": variant.name,
            "family": variant.family,
            "epoch": epoch,
            "pair": variant.pair,
            "source": variant.source,
            "match_sparsity": variant.sparsity,
            "epochs_saved": saved,
        }

    def _barriers(
        self, seed: int, variant: Variant, perm: Permutation, paper: Permutation, seed_a: int
    ) -> dict[str, Any]:
        """Agreement with ``paper`` and the loss barriers of pi_v(A_T) to B_T
        (and to B_e); rank 0 alone computes them."""
        run, c = self.run, self.config
        bn_data = run.data.bn_batches(c.bn_batches, c.batch_size) if run.has_bn() else None
        aligned = apply_permutation(run.load_model("dense", f"seed{seed_a}-A", "final.pt"), perm)
        test = run.data.test_batches()

        def barrier(model_b: nn.Module) -> float:
            return float(lmc_barrier(aligned, model_b, test, num_points=c.barrier_points, bn_data=bn_data).barrier)

        out: dict[str, Any] = {
            "agreement": permutation_agreement(perm, paper),
            "barrier": barrier(run.load_model("dense", f"seed{seed}-B", "final.pt")),
            "barrier_b_e": None,
        }
        if variant.epoch is not None:
            out["barrier_b_e"] = barrier(self.dense_at(seed, "B", variant.epoch))
        return out

    def sparse(
        self, seed: int, variant: Variant, target: float, perm: Permutation, *, shared: bool = False
    ) -> dict[str, Any]:
        """Stage ``variant-sparse``: B_k of ``seed`` with pi_v(m_A) (``shared``:
        m_A0, the mask of seed 0) trained T - k epochs at ``sparse_lr`` with
        the data order of the paper's permuted run of ``seed``."""
        run = self.run
        m_a = self._imp_masks(0 if shared else seed, target)
        masks = {name: m.to(run.device) for name, m in permute_mask(m_a, perm).items()}
        identity = {**self._identity(seed, variant), **({"mask_seed": 0} if shared else {})}
        ref = self.ref_sparse(seed, variant, target, shared=shared)
        return run.train_sparse(ref, f"seed{seed}-B", seed, self.k, target, masks, order="permuted", identity=identity)

    def run_seed(self, seed: int, paper: Permutation) -> dict[str, list[dict[str, Any]]]:
        """Every variant of ``seed``: ``{"matching": [...], "sparse": [...]}``
        (one ``variant-match`` record per variant, one ``variant-sparse``
        record per variant and sparsity); empty without studies."""
        out: dict[str, list[dict[str, Any]]] = {"matching": [], "sparse": []}
        for epoch in self._early_epochs():
            for role in ("B", "A"):
                self.dense_at(seed, role, epoch)
        for variant in self.variants:
            record, perm = self.match(seed, variant, paper)
            out["matching"].append(record)
            out["sparse"] += [self.sparse(seed, variant, t, perm) for t in variant.targets(self.config)]
        return out

    def ensembles(self) -> dict[str, list[dict[str, Any]]]:
        """The permuted ensembles with early matching (module docstring):
        ``{"matching": [...], "sparse": [...], "diversity": [...]}``, the
        ``variant-match`` and ``variant-sparse`` records of members s >= 1
        and one ``variant-diversity`` row per e
        (:meth:`~maskalign.metrics.DiversityReport.to_dict` plus ``variant``,
        ``epoch``, ``k``, ``sparsity`` and ``member_accuracies``); empty
        lists without them."""
        out: dict[str, list[dict[str, Any]]] = {"matching": [], "sparse": [], "diversity": []}
        ensembles = self.ensemble_variants()
        if not ensembles:
            return out
        run = self.run
        target = self.config.table1_level()[0]
        for variant in ensembles:
            for seed in range(1, self.config.seeds):
                record, perm = self.match(seed, variant, run.shared_match(seed)[1], shared=True)
                out["matching"].append(record)
                out["sparse"].append(self.sparse(seed, variant, target, perm, shared=True))
        ref = self.ref_diversity()
        stored = run.finished(ref)
        if stored is None:
            with run.stage(ref):
                rows = self._diversity_rows(ensembles, target) if distributed.is_main() else None
                stored = run.store.finish(
                    "variant-diversity", ref.key, ref.settings, None if rows is None else {"rows": rows}
                )
        out["diversity"] = stored["rows"]
        return out

    def _diversity_rows(self, ensembles: list[Variant], target: float) -> list[dict[str, Any]]:
        """One row per ensemble of :meth:`ensembles` (rank 0 alone computes them)."""
        run, k = self.run, self.k
        rows = []
        for variant in ensembles:
            keys = [self.ref_sparse(s, variant, target, shared=s > 0).key for s in range(self.config.seeds)]
            members = [run.log_probs(run.load_model("variant-sparse", key, "model.pt")) for key in keys]
            report = diversity(members, run.targets).to_dict()
            accuracies = [ensemble_accuracy([m], run.targets) for m in members]
            base = {"variant": variant.name, "epoch": variant.epoch, "k": k, "sparsity": target}
            rows.append({**base, **report, "member_accuracies": accuracies})
        return rows
