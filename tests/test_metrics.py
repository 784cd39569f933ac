"""Tests for maskalign.metrics: ensemble-diversity metrics (Table 1 of Adnan et al., ICML 2025)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor

from maskalign import metrics
from maskalign.errors import DataError
from maskalign.metrics import (
    DiversityReport,
    disagreement,
    diversity,
    ensemble_accuracy,
    js_divergence,
    kl_divergence,
)

LN2 = math.log(2.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest.py)


def logp(*rows: list[float]) -> Tensor:
    """Log-probabilities of the given (normalised) probability rows."""
    return torch.tensor(rows, dtype=torch.float64).log()


# ------------------------------------------------------- hand-computed values
# p = (1/2, 1/2), q = (1/4, 3/4): every number below is worked out by hand.
P = logp([0.5, 0.5])
Q = logp([0.25, 0.75])


def test_kl_two_class_by_hand() -> None:
    # KL(p||q) = 1/2 ln(0.5/0.25) + 1/2 ln(0.5/0.75) = 1/2 ln(4/3)
    assert kl_divergence(P, Q) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-15)
    # KL(q||p) = 1/4 ln(0.25/0.5) + 3/4 ln(0.75/0.5) = -1/4 ln 2 + 3/4 ln(3/2)
    assert kl_divergence(Q, P) == pytest.approx(-0.25 * LN2 + 0.75 * math.log(1.5), abs=1e-15)
    assert kl_divergence(P, Q) != pytest.approx(kl_divergence(Q, P))  # asymmetric


def test_js_two_class_by_hand() -> None:
    # m = (3/8, 5/8); JS = 1/2 KL(p||m) + 1/2 KL(q||m)
    kl_pm = 0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    kl_qm = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)
    expected = 0.5 * kl_pm + 0.5 * kl_qm
    assert js_divergence(P, Q) == pytest.approx(expected, abs=1e-15)
    assert js_divergence(Q, P) == pytest.approx(expected, abs=1e-15)


def test_divergences_average_over_samples() -> None:
    # Two samples: (p, q) and (p, p). The second contributes 0, so the mean is half the first.
    a, b = torch.cat([P, P]), torch.cat([Q, P])
    assert kl_divergence(a, b) == pytest.approx(0.25 * math.log(4 / 3), abs=1e-15)
    assert js_divergence(a, b) == pytest.approx(js_divergence(P, Q) / 2, abs=1e-15)


def test_js_of_disjoint_distributions_is_ln2() -> None:
    # Near one-hot on different classes: JS -> ln 2 (its maximum); KL is large.
    a = torch.tensor([[60.0, -60.0], [-60.0, 60.0]])
    assert js_divergence(a, a.flip(1)) == pytest.approx(LN2, abs=1e-12)
    assert kl_divergence(a, a.flip(1)) == pytest.approx(120.0, rel=1e-9)  # sum_c p_c (l_c - l'_c) ~ 120


def test_disagreement_by_hand() -> None:
    # argmax a = [0, 1, 1, 0], argmax b = [0, 0, 1, 1]: they differ on samples 1 and 3.
    a = torch.tensor([[2.0, 1.0], [0.0, 3.0], [-1.0, 1.0], [5.0, 4.0]])
    b = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.5], [4.0, 5.0]])
    assert disagreement(a, b) == 0.5
    assert disagreement(a, a) == 0.0
    assert disagreement(a, -a) == 1.0


def test_ensemble_accuracy_averages_probabilities_not_logits() -> None:
    # Sample 0 (target 0): arithmetic mean of probabilities = (0.4905, 0.255, 0.2545) -> class 0;
    # the mean of log-probabilities (geometric mean) would pick class 1 (sqrt(0.005) > sqrt(0.00098)).
    m1 = logp([0.98, 0.01, 0.01], [0.2, 0.7, 0.1])
    m2 = logp([0.001, 0.5, 0.499], [0.6, 0.3, 0.1])
    # Sample 1 (target 1): mean = (0.4, 0.5, 0.1) -> class 1 (correct), though m2 alone says 0.
    targets = torch.tensor([0, 1])
    assert ensemble_accuracy([m1, m2], targets) == 1.0
    assert ensemble_accuracy([m1], targets) == 1.0
    assert ensemble_accuracy([m2], targets) == 0.0
    assert ((m1 + m2) / 2).argmax(1)[0] == 1  # what logit averaging would have said
    # One (M, N, C) tensor works like a list.
    assert ensemble_accuracy(torch.stack([m1, m2]), targets) == 1.0


def test_ties_break_towards_the_lowest_class() -> None:
    # p = (1/2, 1/2) is a tie, broken to class 0; q picks class 1: they disagree.
    assert disagreement(P, Q) == 1.0
    assert disagreement(P, logp([0.75, 0.25])) == 0.0


def test_diversity_pairwise_two_members_by_hand() -> None:
    a = logp([0.5, 0.5], [0.9, 0.1])
    b = logp([0.25, 0.75], [0.9, 0.1])
    report = diversity([a, b], torch.tensor([1, 0]))
    # disagreement: sample 0 (tie -> class 0 vs class 1) differs, sample 1 agrees.
    assert report.disagreement == 0.5
    # KL over the ordered pairs (a, b) and (b, a), each a mean over 2 samples whose second term is 0.
    kl_ab = 0.5 * math.log(4 / 3)
    kl_ba = -0.25 * LN2 + 0.75 * math.log(1.5)
    assert report.kl == pytest.approx((kl_ab / 2 + kl_ba / 2) / 2, abs=1e-15)
    assert report.js == pytest.approx(js_divergence(P, Q) / 2, abs=1e-15)
    # ensemble: sample 0 mean (3/8, 5/8) -> 1 (correct); sample 1 -> 0 (correct).
    assert report.ensemble_accuracy == 1.0
    # members alone: a gets sample 0 wrong (tie -> 0), b gets both right.
    assert report.member_accuracy == pytest.approx(0.75)


def test_diversity_pairwise_pair_convention() -> None:
    g = torch.Generator().manual_seed(0)
    members = [torch.randn(20, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    targets = torch.randint(0, 5, (20,), generator=g)
    report = diversity(members, targets)
    unordered = [(0, 1), (0, 2), (1, 2)]
    ordered = [(i, j) for i in range(3) for j in range(3) if i != j]
    assert report.members == 3
    assert report.disagreement == pytest.approx(np.mean([disagreement(members[i], members[j]) for i, j in unordered]))
    assert report.js == pytest.approx(np.mean([js_divergence(members[i], members[j]) for i, j in unordered]))
    assert report.kl == pytest.approx(np.mean([kl_divergence(members[i], members[j]) for i, j in ordered]))
    assert report.ensemble_accuracy == ensemble_accuracy(members, targets)
    assert report.member_accuracy == pytest.approx(np.mean([ensemble_accuracy([m], targets) for m in members]))


def test_diversity_reference_mode() -> None:
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(16, 4, generator=g)
    members = [torch.randn(16, 4, generator=g) for _ in range(3)]
    targets = torch.randint(0, 4, (16,), generator=g)
    report = diversity(members, targets, reference=ref)
    assert report.mode == "reference"
    assert report.members == 3
    assert report.disagreement == pytest.approx(np.mean([disagreement(ref, m) for m in members]))
    assert report.kl == pytest.approx(np.mean([kl_divergence(ref, m) for m in members]))  # KL(ref || member)
    assert report.js == pytest.approx(np.mean([js_divergence(ref, m) for m in members]))
    # The reference is not part of the ensemble.
    assert report.ensemble_accuracy == ensemble_accuracy(members, targets)
    # One member is enough against a reference.
    single = diversity(members[:1], targets, reference=ref)
    assert single.members == 1 and single.kl == pytest.approx(kl_divergence(ref, members[0]))


def test_diversity_report_is_frozen_and_serialisable() -> None:
    report = diversity([P, Q], torch.tensor([1]))
    assert isinstance(report, DiversityReport)
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.kl = 0.0  # type: ignore[misc]
    d = report.to_dict()
    assert d == {
        "mode": "pairwise",
        "disagreement": report.disagreement,
        "kl": report.kl,
        "js": report.js,
        "ensemble_accuracy": report.ensemble_accuracy,
        "member_accuracy": report.member_accuracy,
        "members": 2,
    }
    import json

    assert json.loads(json.dumps(d)) == d


def test_inputs_are_not_modified_and_any_float_dtype_works() -> None:
    a = torch.randn(8, 3, dtype=torch.float32, requires_grad=True)
    b = torch.randn(8, 3, dtype=torch.float16)
    a_before = a.detach().clone()
    value = js_divergence(a, b)
    assert isinstance(value, float)
    assert torch.equal(a.detach(), a_before)
    assert value == pytest.approx(js_divergence(a.detach().double(), b.double()), abs=1e-12)
    assert isinstance(disagreement(a, b), float)


def test_module_exports() -> None:
    assert set(metrics.__all__) == {
        "DiversityReport",
        "disagreement",
        "diversity",
        "ensemble_accuracy",
        "js_divergence",
        "kl_divergence",
    }


# ---------------------------------------------------------------- properties
# Logits on a 1/8 grid in [-8, 8]: distinct logits stay distinct under shifts
# and log_softmax (no rounding-made ties that would move an argmax).
GRID = st.integers(-64, 64).map(lambda k: k / 8)


@st.composite
def logit_pair(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
    n, c = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    a = draw(hnp.arrays(np.float64, (n, c), elements=GRID))
    b = draw(hnp.arrays(np.float64, (n, c), elements=GRID))
    return torch.from_numpy(a), torch.from_numpy(b)


@given(logit_pair())
def test_bounds(pair: tuple[Tensor, Tensor]) -> None:
    a, b = pair
    assert 0.0 <= disagreement(a, b) <= 1.0
    assert kl_divergence(a, b) >= 0.0
    assert 0.0 <= js_divergence(a, b) <= LN2


@given(logit_pair())
def test_symmetry_and_identity(pair: tuple[Tensor, Tensor]) -> None:
    a, b = pair
    assert js_divergence(a, b) == pytest.approx(js_divergence(b, a), abs=1e-14)
    assert disagreement(a, b) == disagreement(b, a)
    assert kl_divergence(a, a) == 0.0
    assert js_divergence(a, a) == pytest.approx(0.0, abs=1e-15)  # log m = logaddexp(a, a) - ln 2 rounds
    assert disagreement(a, a) == 0.0


@given(logit_pair())
def test_js_is_at_most_half_symmetric_kl(pair: tuple[Tensor, Tensor]) -> None:
    # JS(p, q) <= (KL(p||q) + KL(q||p)) / 4 (Lin 1991, from convexity of KL).
    a, b = pair
    assert js_divergence(a, b) <= (kl_divergence(a, b) + kl_divergence(b, a)) / 4 + 1e-12


@given(logit_pair())
def test_logits_and_log_probabilities_give_the_same_answer(pair: tuple[Tensor, Tensor]) -> None:
    a, b = pair
    la, lb = torch.log_softmax(a, dim=1), torch.log_softmax(b, dim=1)
    assert disagreement(la, lb) == disagreement(a, b)
    assert kl_divergence(la, lb) == pytest.approx(kl_divergence(a, b), abs=1e-12)
    assert js_divergence(la, lb) == pytest.approx(js_divergence(a, b), abs=1e-12)


@given(logit_pair(), st.data())
def test_per_sample_shift_invariance(pair: tuple[Tensor, Tensor], data: st.DataObject) -> None:
    a, b = pair
    n = a.shape[0]
    shift_a = torch.from_numpy(data.draw(hnp.arrays(np.float64, (n, 1), elements=GRID)))
    shift_b = torch.from_numpy(data.draw(hnp.arrays(np.float64, (n, 1), elements=GRID)))
    assert disagreement(a + shift_a, b + shift_b) == disagreement(a, b)
    assert kl_divergence(a + shift_a, b + shift_b) == pytest.approx(kl_divergence(a, b), abs=1e-12)
    assert js_divergence(a + shift_a, b + shift_b) == pytest.approx(js_divergence(a, b), abs=1e-12)


@given(st.integers(2, 4), st.integers(1, 8), st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_diversity_bounds_and_member_order(m: int, n: int, c: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    members = [torch.randn(n, c, generator=g, dtype=torch.float64) * 3 for _ in range(m)]
    targets = torch.randint(0, c, (n,), generator=g)
    report = diversity(members, targets)
    assert 0.0 <= report.disagreement <= 1.0
    assert report.kl >= 0.0
    assert 0.0 <= report.js <= LN2
    assert 0.0 <= report.ensemble_accuracy <= 1.0
    assert report.members == m
    reverse = diversity(members[::-1], targets)
    assert reverse.disagreement == pytest.approx(report.disagreement, abs=1e-12)
    assert reverse.kl == pytest.approx(report.kl, abs=1e-12)
    assert reverse.js == pytest.approx(report.js, abs=1e-12)


# -------------------------------------------------------------------- errors
GOOD = torch.zeros(3, 2)


@pytest.mark.parametrize("fn", [disagreement, kl_divergence, js_divergence])
@pytest.mark.parametrize(
    ("a", "b", "culprit", "words"),
    [
        (GOOD, torch.zeros(3, 3), "b", "one shape"),
        (torch.zeros(4, 2), GOOD, "a", "one shape"),
        (torch.zeros(3), GOOD, "a", r"shape \(N, C\)"),
        (GOOD, torch.zeros(1, 3, 2), "b", r"shape \(N, C\)"),
        (torch.zeros(0, 2), torch.zeros(0, 2), "a", "no samples"),
        (GOOD, torch.zeros(3, 0), "b", "no classes"),
        (torch.tensor([[0.0, float("nan")], [0.0, 0.0], [0.0, 0.0]]), GOOD, "a", "non-finite"),
        (GOOD, torch.tensor([[0.0, 0.0], [float("-inf"), 0.0], [0.0, 0.0]]), "b", "non-finite"),
        (GOOD, torch.tensor([[0.0, float("inf")]] * 3), "b", "non-finite"),
        (torch.zeros(3, 2, dtype=torch.int64), GOOD, "a", "floating-point"),
        ([[0.0, 0.0]] * 3, GOOD, "a", "torch.Tensor"),
    ],
)
def test_pair_errors_name_the_argument(fn, a, b, culprit: str, words: str) -> None:  # type: ignore[no-untyped-def]
    names = {"a": "p", "b": "q"} if fn is kl_divergence else {"a": "a", "b": "b"}
    with pytest.raises(DataError, match=words) as info:
        fn(a, b)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith((f"Argument '{names[culprit]}'", "Arguments ")), message
    assert f"'{names[culprit]}'" in message


def test_non_finite_error_gives_advice_and_sample() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    with pytest.raises(DataError, match=r"Argument 'a' has 1 non-finite value\(s\) \(first in sample 0\).*log_softmax"):
        js_divergence(probs.log(), probs.log())


TARGETS = torch.tensor([0, 1, 0])


@pytest.mark.parametrize("fn", [ensemble_accuracy, diversity])
@pytest.mark.parametrize(
    ("logits", "targets", "words"),
    [
        ([], TARGETS, r"Argument 'logits' is empty"),
        ("ab", TARGETS, r"Argument 'logits' is a str; pass a sequence"),
        (torch.zeros(3, 2), TARGETS, r"Argument 'logits' is a tensor of shape \(3, 2\); pass a sequence"),
        (
            [GOOD, torch.zeros(3, 3)],
            TARGETS,
            r"Arguments 'logits\[0\]' and 'logits\[1\]' have shapes \(3, 2\) and \(3, 3\)",
        ),
        ([GOOD, torch.zeros(3)], TARGETS, r"Argument 'logits\[1\]' has shape \(3,\); pass .* shape \(N, C\)"),
        ([GOOD, torch.full((3, 2), float("nan"))], TARGETS, r"Argument 'logits\[1\]' has 6 non-finite"),
        (
            [GOOD, GOOD],
            torch.tensor([0.0, 1.0, 0.0]),
            r"Argument 'targets' has dtype torch.float32; pass an integer tensor",
        ),
        ([GOOD, GOOD], torch.tensor([True, False, True]), r"Argument 'targets' has dtype torch.bool"),
        ([GOOD, GOOD], torch.tensor([0, 1]), r"Argument 'targets' has shape \(2,\); pass shape \(3,\)"),
        ([GOOD, GOOD], torch.tensor([[0, 1, 0]]), r"Argument 'targets' has shape \(1, 3\); pass shape \(3,\)"),
        (
            [GOOD, GOOD],
            torch.tensor([0, 2, 0]),
            r"Argument 'targets' holds values in \[0, 2\]; pass class indices in \[0, 1\]",
        ),
        ([GOOD, GOOD], torch.tensor([0, -1, 0]), r"Argument 'targets' holds values in \[-1, 0\]"),
        ([GOOD, GOOD], [0, 1, 0], r"Argument 'targets' is a list; pass a torch.Tensor"),
    ],
)
def test_ensemble_errors(fn, logits, targets, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DataError, match=words):
        fn(logits, targets)


def test_pairwise_needs_two_members() -> None:
    with pytest.raises(DataError, match=r"Argument 'logits' has 1 member; pairwise diversity needs at least 2"):
        diversity([GOOD], TARGETS)
    with pytest.raises(DataError, match=r"at least 2"):
        diversity(GOOD.unsqueeze(0), TARGETS)


def test_reference_errors() -> None:
    with pytest.raises(DataError, match=r"Arguments 'reference' and 'logits\[0\]' have shapes"):
        diversity([GOOD, GOOD], TARGETS, reference=torch.zeros(3, 3))
    with pytest.raises(DataError, match=r"Argument 'reference' has 1 non-finite"):
        diversity([GOOD], TARGETS, reference=torch.tensor([[0.0, 0.0], [0.0, float("nan")], [0.0, 0.0]]))
