"""Second tier: every torchvision classification model and the timm models
of ``zoo.vision.TIMM_MODELS`` through the zoo check (``zoo.harness.run_case``).

Runs in its own virtual environment (``.ci/run``, stage 2: torch 2.14.1,
torchvision, timm); skipped cleanly where torchvision or timm is missing, so
the main tier is unaffected. Models that the check finds broken today are
strict xfails in ``KNOWN_BUGS`` (the fix turns them into failures, and then
the mark must go).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (zoo package)

pytest.importorskip("torchvision")
pytest.importorskip("timm")

from zoo import vision  # noqa: E402
from zoo.harness import Case, run_case  # noqa: E402

# model -> the broken promise, as measured (see the zoo report in docs/coverage.md)
KNOWN_BUGS: dict[str, str] = {}

# too slow or too big for the CI machine (2 cores, 24 GiB) even in float32
SKIP = {
    "tv-vit_h_14": "632M parameters: ~2.5 GiB per float32 copy, the check holds about 5 copies; minutes per forward",
    "tv-regnet_y_128gf": "645M parameters: ~2.6 GiB per float32 copy, minutes per forward on 2 cores",
}

CASES: list[Case] = vision.torchvision_cases() + vision.timm_cases()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SLOW_PARAMS = 15_000_000  # torchvision models above this many parameters are marked slow (CI: -m "not slow")


def _num_params(case: Case) -> int:
    if case.family != "torchvision":
        return 0
    import torchvision

    weights = list(torchvision.models.get_model_weights(case.name.removeprefix("tv-")))
    return int(weights[0].meta.get("num_params", 0)) if weights else 0


def _param(case: Case) -> object:
    marks = []
    if _num_params(case) > SLOW_PARAMS:
        marks.append(pytest.mark.slow)
    if case.name in SKIP:
        marks.append(pytest.mark.skip(reason=SKIP[case.name]))
    elif case.name in KNOWN_BUGS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[case.name]))
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_vision_model(case: Case) -> None:
    r = run_case(case)
    print(f"\n{case.name}: coverage {r.coverage}, {r.groups} groups, eval {r.eval_error}, train {r.train_error}, "
          f"floor {r.floor}, {r.seconds:.1f}s")
    assert not r.problems, "\n".join(r.problems)


def test_vision_zoo_size() -> None:
    import torchvision

    classification = torchvision.models.list_models(module=torchvision.models)
    assert {c.name for c in CASES if c.family == "torchvision"} == {f"tv-{n}" for n in classification}
    assert sum(c.family == "timm" for c in CASES) >= 80
