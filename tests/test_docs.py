"""Every ```python block of the docs runs, and the site builds with
``mkdocs build --strict``.

Blocks of one page run in order in one namespace (a page is one script), in a
temporary working directory. A block is skipped only when the line before its
fence is ``<!-- skip -->`` (kept for illustrative fragments; there should be
almost none). Blocks in other languages (``bash``, ``text``) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^\n]*)$")
SKIP = "<!-- skip -->"


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: bool


def python_blocks(path: Path, root: Path = DOCS) -> list[Block]:
    """The fenced ```python / ```py blocks of a markdown file, with their line
    numbers; indented fences (inside admonitions or lists) are dedented."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, ticks = match["indent"], match["ticks"]
        language = (match["info"].strip().split() or [""])[0].strip("{}.").lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (lines[i].strip() == ticks and lines[i].startswith(indent)):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        if language in ("python", "py", "python3"):
            previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            rel = str(path.relative_to(root))
            blocks.append(Block(rel, start + 1, "\n".join(body) + "\n", previous == SKIP))
    return blocks


PAGES = sorted(DOCS.rglob("*.md"))
PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_docs_have_pages_and_code() -> None:
    names = {str(p.relative_to(DOCS)) for p in PAGES}
    for required in ("index.md", "getting-started.md", "concepts.md", "benchmarks.md"):
        assert required in names
    assert len(PAGES_WITH_CODE) >= 5
    skipped = [f"{b.page}:{b.line}" for p in PAGES for b in python_blocks(p) if b.skip]
    assert len(skipped) <= 3, f"too many skipped doc blocks: {skipped}"


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second intra-op thread only adds contention
    namespace: dict[str, object] = {"__name__": "__docs__"}
    try:
        for block in python_blocks(page):
            if block.skip:
                continue
            code = compile(block.code, f"docs/{block.page}:{block.line}", "exec")
            try:
                exec(code, namespace)
            except Exception as exc:
                raise AssertionError(f"code block at docs/{block.page}, line {block.line} failed: {exc!r}") from exc
    finally:
        torch.set_num_threads(threads)
        try:
            import matplotlib.pyplot as plt

            plt.close("all")
        except ImportError:
            pass


def test_fence_parser(tmp_path: Path) -> None:
    text = '# t\n\n```python\nx = 1\n```\n\n<!-- skip -->\n```python\nraise SystemExit\n```\n\n```bash\nls\n```\n\n!!! note\n    ```python\n    y = x + 1\n    ```\n'
    path = tmp_path / "page.md"
    path.write_text(text, encoding="utf-8")
    blocks = python_blocks(path, tmp_path)
    assert [(b.code, b.skip) for b in blocks] == [("x = 1\n", False), ("raise SystemExit\n", True), ("y = x + 1\n", False)]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="docs dependencies not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="docs dependencies not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="docs dependencies not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material 9.7+ prints a notice about MkDocs 2
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site), "--config-file", str(ROOT / "mkdocs.yml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "concepts/index.html", "reference/matching/index.html", "benchmarks/index.html"):
        assert (site / page).is_file(), page
    assert (site / "figures" / "permutation.png").is_file()
