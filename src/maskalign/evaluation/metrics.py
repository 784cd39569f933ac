"""Ensemble-diversity metrics between classifiers' predictions.

The function-space similarity measures of Table 1 of Adnan, Jain, Sharma,
Krishnan, Ioannou, *Sparse Training from Random Initialization: Aligning
Lottery Ticket Masks using Weight Symmetry* (ICML 2025, Sec. 4.2), which follows
Evci et al. (AAAI 2022) and Fort, Hu, Lakshminarayanan, *Deep Ensembles: A Loss
Landscape Perspective* (2019):

* disagreement: the fraction of samples on which two models' top-1
  predictions differ (Fort et al. 2019, Sec. 4.1);
* KL: the Kullback--Leibler divergence ``KL(p || q) = sum_c p_c (log p_c - log q_c)``
  of the predictive distributions, averaged over samples, in nats;
* JS: the Jensen--Shannon divergence ``JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2``
  with ``m = (p + q) / 2``, averaged over samples, in nats (symmetric, in ``[0, ln 2]``);
* ensemble accuracy: the accuracy of the argmax of the members' averaged
  probabilities (Lakshminarayanan et al. 2017).

Every prediction argument is a ``(N, C)`` tensor of logits *or* of
log-probabilities (N samples, C classes), in any floating dtype and on any
device: it is normalised with ``log_softmax`` in float64 on the CPU, so
logits, logits plus a per-sample constant and their ``log_softmax`` all give
the same answer, and divergences are computed from log-probabilities (no
``log(0)``). Metrics are evaluation tools: no gradient flows through them.

Example::

    import maskalign as ma
    report = ma.metrics.diversity([logits_1, logits_2, logits_3], targets)
    report.disagreement, report.kl, report.js, report.ensemble_accuracy
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import DataError

__all__ = [
    "DiversityReport",
    "disagreement",
    "diversity",
    "ensemble_accuracy",
    "js_divergence",
    "kl_divergence",
]

_LN2 = math.log(2.0)


# ---------------------------------------------------------------- validation
def _log_probs(x: object, name: str) -> Tensor:
    """``x`` validated as ``(N, C)`` logits / log-probabilities, returned as
    float64 log-probabilities on the CPU."""
    if not isinstance(x, Tensor):
        raise DataError(f"Argument '{name}' is a {type(x).__name__}; pass a torch.Tensor of shape (N, C).")
    if x.ndim != 2:
        raise DataError(
            f"Argument '{name}' has shape {tuple(x.shape)}; pass logits or log-probabilities of shape (N, C)."
        )
    if not x.is_floating_point():
        raise DataError(
            f"Argument '{name}' has dtype {x.dtype}; pass a floating-point tensor of logits or log-probabilities."
        )
    n, c = x.shape
    if n == 0:
        raise DataError(
            f"Argument '{name}' has no samples (shape {tuple(x.shape)}); pass (N, C) predictions with N > 0."
        )
    if c == 0:
        raise DataError(
            f"Argument '{name}' has no classes (shape {tuple(x.shape)}); pass (N, C) predictions with C > 0."
        )
    x = x.detach().to(device="cpu", dtype=torch.float64)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        row = int((~finite).any(dim=1).nonzero()[0, 0])
        raise DataError(
            f"Argument '{name}' has {bad} non-finite value(s) (first in sample {row}); pass logits or "
            "F.log_softmax(logits) rather than torch.log(probabilities), which gives -inf for p = 0."
        )
    return torch.log_softmax(x, dim=1)


def _same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise DataError(
            f"Arguments '{name_a}' and '{name_b}' have shapes {tuple(a.shape)} and {tuple(b.shape)}; pass "
            "predictions of one shape (N, C)."
        )


def _pair(a: object, b: object, name_a: str, name_b: str) -> tuple[Tensor, Tensor]:
    la, lb = _log_probs(a, name_a), _log_probs(b, name_b)
    _same_shape(la, lb, name_a, name_b)
    return la, lb


def _members(logits: object, name: str = "logits") -> list[Tensor]:
    """A sequence of ``(N, C)`` tensors (or one ``(M, N, C)`` tensor) as
    float64 log-probabilities of one shape."""
    if isinstance(logits, Tensor):
        if logits.ndim != 3:
            raise DataError(
                f"Argument '{name}' is a tensor of shape {tuple(logits.shape)}; pass a sequence of (N, C) "
                "tensors or one (M, N, C) tensor."
            )
        items: list[object] = list(logits.unbind(0))
    elif isinstance(logits, Sequence) and not isinstance(logits, (str, bytes)):
        items = list(logits)
    else:
        raise DataError(
            f"Argument '{name}' is a {type(logits).__name__}; pass a sequence of (N, C) tensors or one "
            "(M, N, C) tensor."
        )
    if not items:
        raise DataError(f"Argument '{name}' is empty; pass at least one member's (N, C) predictions.")
    members = [_log_probs(item, f"{name}[{i}]") for i, item in enumerate(items)]
    for i, member in enumerate(members[1:], start=1):
        _same_shape(members[0], member, f"{name}[0]", f"{name}[{i}]")
    return members


def _targets(targets: object, n: int, c: int, name: str = "targets") -> Tensor:
    if not isinstance(targets, Tensor):
        raise DataError(
            f"Argument '{name}' is a {type(targets).__name__}; pass a torch.Tensor of class indices of shape ({n},)."
        )
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise DataError(f"Argument '{name}' has dtype {targets.dtype}; pass an integer tensor of class indices.")
    if tuple(targets.shape) != (n,):
        raise DataError(
            f"Argument '{name}' has shape {tuple(targets.shape)}; pass shape ({n},) to match the predictions' N."
        )
    targets = targets.detach().to(device="cpu", dtype=torch.int64)
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= c:
        raise DataError(
            f"Argument '{name}' holds values in [{low}, {high}]; pass class indices in [0, {c - 1}] (C = {c} classes)."
        )
    return targets


# ------------------------------------------------------- per-sample kernels
def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p_i || q_i)`` per sample, nats; clamped at 0 against rounding (Gibbs)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min(0.0)


def _js_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``JS(p_i, q_i)`` per sample, nats, clamped to ``[0, ln 2]`` against rounding."""
    log_m = torch.logaddexp(log_p, log_q) - _LN2
    return (0.5 * (_kl_rows(log_p, log_m) + _kl_rows(log_q, log_m))).clamp(0.0, _LN2)


def _disagree(log_p: Tensor, log_q: Tensor) -> float:
    return float((log_p.argmax(dim=1) != log_q.argmax(dim=1)).double().mean())


def _ensemble_accuracy(members: list[Tensor], targets: Tensor) -> float:
    mean_probs = torch.stack([m.exp() for m in members]).mean(dim=0)
    return float((mean_probs.argmax(dim=1) == targets).double().mean())


# ------------------------------------------------------------ public metrics
def disagreement(a: Tensor, b: Tensor) -> float:
    """Fraction of samples on which the top-1 predictions of ``a`` and ``b`` differ.

    ``mean_i [argmax_c a_ic != argmax_c b_ic]`` (Fort et al. 2019, Sec. 4.1;
    the "Disagreement" column of Table 1 of Adnan et al., ICML 2025).
    Ties are broken towards the lowest class index.

    Source: Fort, Hu, Lakshminarayanan, "Deep Ensembles: A Loss Landscape
    Perspective", 2019, Sec. 4.1; Adnan et al., ICML 2025, Table 1.

    Args:
        a: ``(N, C)`` logits or log-probabilities of one model.
        b: ``(N, C)`` logits or log-probabilities of another model on the
            same samples.

    Returns:
        A fraction in ``[0, 1]`` (symmetric in ``a`` and ``b``).

    Raises:
        DataError: an argument is not a floating ``(N, C)`` tensor, has no
            samples or non-finite values, or the shapes differ.
    """
    la, lb = _pair(a, b, "a", "b")
    return _disagree(la, lb)


def kl_divergence(p: Tensor, q: Tensor) -> float:
    """Mean over samples of ``KL(p_i || q_i) = sum_c p_ic (log p_ic - log q_ic)``, in nats.

    The "KL" column of Table 1 of Adnan et al. (ICML 2025), following Fort et
    al. (2019) and Evci et al. (2022). Not symmetric: ``p`` is the distribution
    the expectation is taken under.

    Source: Adnan et al., ICML 2025, Table 1 (after Fort et al. 2019 and Evci
    et al., AAAI 2022).

    Args:
        p: ``(N, C)`` logits or log-probabilities of the distribution the
            expectation is taken under; each row is normalised with
            ``log_softmax`` in float64.
        q: ``(N, C)`` logits or log-probabilities of the other distribution,
            normalised the same way.

    Returns:
        A non-negative float (0 exactly when every row of ``p`` equals that of ``q``).

    Raises:
        DataError: an argument is not a floating ``(N, C)`` tensor, has no
            samples or non-finite values, or the shapes differ.
    """
    lp, lq = _pair(p, q, "p", "q")
    return float(_kl_rows(lp, lq).mean())


def js_divergence(a: Tensor, b: Tensor) -> float:
    """Mean over samples of the Jensen--Shannon divergence, in nats.

    ``JS(a_i, b_i) = KL(a_i || m_i) / 2 + KL(b_i || m_i) / 2`` with
    ``m_i = (a_i + b_i) / 2`` (Lin 1991); the "JS" column of Table 1 of Adnan et
    al. (ICML 2025), following Evci et al. (2022). ``log m`` is computed as
    ``logaddexp(log a, log b) - ln 2``.

    Source: Adnan et al., ICML 2025, Table 1 (after Evci et al., AAAI 2022);
    the divergence of Lin (1991).

    Args:
        a: ``(N, C)`` logits or log-probabilities of one model.
        b: ``(N, C)`` logits or log-probabilities of another model on the
            same samples.

    Returns:
        A float in ``[0, ln 2]``, symmetric in ``a`` and ``b``.

    Raises:
        DataError: an argument is not a floating ``(N, C)`` tensor, has no
            samples or non-finite values, or the shapes differ.
    """
    la, lb = _pair(a, b, "a", "b")
    return float(_js_rows(la, lb).mean())


def ensemble_accuracy(logits: Sequence[Tensor] | Tensor, targets: Tensor) -> float:
    """Accuracy of an ensemble that averages its members' probabilities.

    ``mean_i [argmax_c (1/M) sum_m softmax(logits_m)_ic == targets_i]``
    (the "Ensemble Acc." column of Table 1 of Adnan et al., ICML 2025). A
    single member gives that member's accuracy.

    Source: Adnan et al., ICML 2025, Table 1; the probability-averaging
    ensemble of Lakshminarayanan et al. (2017).

    Args:
        logits: ``M >= 1`` tensors of shape ``(N, C)`` (logits or
            log-probabilities), or one ``(M, N, C)`` tensor.
        targets: integer class indices of shape ``(N,)`` in ``[0, C)``.

    Returns:
        A fraction in ``[0, 1]``.

    Raises:
        DataError: no members, a member is malformed (see :func:`disagreement`),
            members differ in shape, or ``targets`` has the wrong shape, dtype
            or range.
    """
    members = _members(logits)
    n, c = members[0].shape
    return _ensemble_accuracy(members, _targets(targets, n, c))


@dataclass(frozen=True)
class DiversityReport:
    """Diversity of an ensemble (output of :func:`diversity`).

    The metrics of Table 1 of Adnan et al. (ICML 2025, Sec. 4.2).

    Attributes:
        mode: ``"pairwise"`` (members against each other) or ``"reference"``
            (each member against one reference model).
        disagreement: mean top-1 disagreement over the pairs (see
            :func:`diversity`), a fraction in ``[0, 1]``.
        kl: mean KL divergence over the pairs, in nats.
        js: mean Jensen--Shannon divergence over the pairs, in nats, in
            ``[0, ln 2]``.
        ensemble_accuracy: accuracy of the members' averaged probabilities,
            a fraction in ``[0, 1]`` (the reference model is never part of
            the ensemble).
        member_accuracy: mean accuracy of the members alone, a fraction in
            ``[0, 1]``.
        members: the ensemble size M.

    Source: Adnan et al., ICML 2025, Table 1.
    """

    mode: Literal["pairwise", "reference"]
    disagreement: float
    kl: float
    js: float
    ensemble_accuracy: float
    member_accuracy: float
    members: int

    def to_dict(self) -> dict[str, str | float | int]:
        """The fields as a plain (JSON-serialisable) dict.

        Returns:
            Field name -> value (``mode`` a str, ``members`` an int, the
            metrics floats).
        """
        return asdict(self)


def diversity(
    logits: Sequence[Tensor] | Tensor,
    targets: Tensor,
    reference: Tensor | None = None,
) -> DiversityReport:
    """Function-space diversity of an ensemble: disagreement, KL, JS and accuracy.

    Table 1 of Adnan et al. (ICML 2025, Sec. 4.2) reports these for ensembles of
    sparse models trained from different seeds (following Evci et al. 2022 and
    Fort et al. 2019).

    Source: Adnan et al., ICML 2025, Sec. 4.2 and Table 1; Fort et al. 2019
    (disagreement, Sec. 4.1).

    Pair convention:

    * ``reference is None`` (``mode="pairwise"``, needs ``M >= 2``):
      disagreement and JS (symmetric) are averaged over the ``M (M - 1) / 2``
      unordered pairs ``{i, j}``, ``i != j``; KL (asymmetric) over the
      ``M (M - 1)`` ordered pairs ``(i, j)``, ``i != j``, i.e. the mean of
      ``KL(p_i || p_j)`` and ``KL(p_j || p_i)`` over unordered pairs. A member
      is never paired with itself.
    * ``reference`` given (``mode="reference"``, ``M >= 1``): each member
      ``m`` against the reference ``r``, averaged over members; KL is
      ``KL(p_r || p_m)`` (expectation under the reference).

    Args:
        logits: ``M`` tensors of shape ``(N, C)`` (logits or
            log-probabilities of each member on the same samples), or one
            ``(M, N, C)`` tensor.
        targets: integer class indices of shape ``(N,)`` in ``[0, C)``.
        reference: optional ``(N, C)`` logits or log-probabilities of a
            reference model (e.g. the dense or IMP solution).

    Returns:
        A :class:`DiversityReport` (fractions in ``[0, 1]``, divergences in nats).

    Raises:
        DataError: fewer than 2 members in pairwise mode (or none at all),
            malformed or mismatched predictions, or malformed ``targets``
            (see :func:`ensemble_accuracy`).
    """
    members = _members(logits)
    n, c = members[0].shape
    labels = _targets(targets, n, c)
    count = len(members)
    accuracy = _ensemble_accuracy(members, labels)
    member_accuracy = sum(_ensemble_accuracy([m], labels) for m in members) / count

    if reference is None:
        if count < 2:
            raise DataError(
                f"Argument 'logits' has {count} member; pairwise diversity needs at least 2 (or pass reference=...)."
            )
        pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
        dis = sum(_disagree(members[i], members[j]) for i, j in pairs) / len(pairs)
        js = sum(float(_js_rows(members[i], members[j]).mean()) for i, j in pairs) / len(pairs)
        kl = sum(
            float(_kl_rows(members[i], members[j]).mean()) + float(_kl_rows(members[j], members[i]).mean())
            for i, j in pairs
        ) / (2 * len(pairs))
        mode: Literal["pairwise", "reference"] = "pairwise"
    else:
        ref = _log_probs(reference, "reference")
        _same_shape(ref, members[0], "reference", "logits[0]")
        dis = sum(_disagree(ref, m) for m in members) / count
        js = sum(float(_js_rows(ref, m).mean()) for m in members) / count
        kl = sum(float(_kl_rows(ref, m).mean()) for m in members) / count
        mode = "reference"

    return DiversityReport(
        mode=mode,
        disagreement=dis,
        kl=kl,
        js=js,
        ensemble_accuracy=accuracy,
        member_accuracy=member_accuracy,
        members=count,
    )
