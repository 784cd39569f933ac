"""The report's top-5 tables: present when the records carry ``test_top5``
(ImageNet, the paper's Figure 7 metric), absent otherwise, so that the
report of every other run is unchanged."""

from __future__ import annotations

import copy
from typing import Any

from maskalign.repro.report import brief_summary, markdown_table

KS, SPARSITIES, METHODS = [0, 5], [0.8, 0.9], ["lth", "naive", "permuted"]


def _results(top5: bool) -> dict[str, Any]:
    """A small results dict of two seeds (as reproduce returns), top-5 =
    top-1 + 0.1 when ``top5``."""

    def scores(acc: float) -> dict[str, float]:
        return {"test_loss": 1.0, "test_acc": acc, **({"test_top5": acc + 0.1} if top5 else {})}

    dense = [{"seed": s, "model": m, **scores(0.7 + 0.01 * s)} for s in (0, 1) for m in "AB"]
    sparse = [
        {"seed": s, "k": k, "sparsity": t, "method": m, **scores(0.5 + 0.02 * s + k / 100), "mask_sparsity": t}
        for s in (0, 1)
        for t in SPARSITIES
        for k in KS
        for m in METHODS
    ]
    imp = [{"seed": s, "sparsity": t, "method": "imp", **scores(0.6 + 0.02 * s), "mask_sparsity": t}
           for s in (0, 1) for t in SPARSITIES]  # fmt: skip
    config = {
        "dataset": "imagenet", "model": "resnet50", "width": 1, "hidden": [128], "epochs": 90,
        "rewind_epochs": KS, "sparsities": SPARSITIES, "seeds": 2, "batch_size": 256, "momentum": 0.9,
        "weight_decay": 1e-4, "lr": 0.1, "sparse_lr": 0.1, "augment": True, "prune_rate": 0.2,
        "imp_epochs": 10, "imp_lr": 0.01, "methods": METHODS,
    }  # fmt: skip
    return {
        "config": config, "preset": "imagenet-resnet50", "device": "cuda:0", "dense": dense, "sparse": sparse,
        "imp": imp, "imp_history": [], "lmc": [], "diversity": [], "shared_mask": None,
    }  # fmt: skip


def test_without_top5_records_there_is_no_top5_table() -> None:
    table = markdown_table(_results(top5=False))
    assert "top-5" not in table.lower()
    assert "| S | IMP |\n|---|---|\n| 80% | 61.00 +- 1.41 |" in table


def test_top5_records_add_a_table_a_dense_line_and_an_imp_column() -> None:
    results = _results(top5=True)
    table = markdown_table(results)
    assert "Dense top-5 test accuracy (A and B, all seeds): 80.50 +- 0.58 %." in table
    heading = "## Top-5 test accuracy (%) by rewind point k, mean +- std over 2 seed(s)"
    top5 = table[table.index(heading) :].splitlines()
    assert top5[2:4] == ["| S | method | k=0 | k=5 |", "|---|---|---|---|"]
    assert top5[4] == "| 80% | LTH | 61.00 +- 1.41 | 66.00 +- 1.41 |"  # 100 * (0.5 + 0.02 s + k / 100 + 0.1)
    assert "| S | IMP | IMP top-5 |\n|---|---|---|\n| 80% | 61.00 +- 1.41 | 71.00 +- 1.41 |" in table
    # the top-1 table is that of the same results without top-5

    def top1(text: str) -> str:
        start = text.index("## Test accuracy")
        return text[start : text.index("\n\n## ", start)]

    plain = markdown_table(_results(top5=False))
    assert top1(table) == top1(plain) and "| 80% | LTH | 51.00 +- 1.41 | 56.00 +- 1.41 |" in top1(plain)
    assert heading in brief_summary(results)  # the end of a run shows it too


def test_imp_records_without_top5_leave_an_empty_cell() -> None:
    results = _results(top5=True)
    old = copy.deepcopy(results)
    for record in results["imp"]:  # an IMP stage from before its records carried top-5
        del record["test_top5"]
    assert "| S | IMP |\n|---|---|\n| 80% |" in markdown_table(results)
    assert markdown_table(old) != markdown_table(results)
