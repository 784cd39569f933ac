"""Every ```python block of the docs runs, and the site builds with
``mkdocs build --strict``.

Blocks of one page run in order in one namespace (a page is one script), in a
temporary working directory. A block is skipped only when the line before its
fence is ``<!-- skip -->`` (kept for illustrative fragments; there should be
almost none). Blocks in other languages (``bash``, ``text``) are not run.
"""

from __future__ import annotations

import html
import os
import re
import shlex
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


@pytest.fixture(autouse=True)
def _restore_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages and docstring examples register rules (register_rule's example
    replaces aten::roll's built-in rule): every test here gets them back."""
    from maskalign.spec.rules import registry

    monkeypatch.setattr(registry, "_TABLE", dict(registry._TABLE))


@pytest.mark.slow
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
    text = (
        "# t\n\n```python\nx = 1\n```\n\n<!-- skip -->\n```python\nraise SystemExit\n```\n\n"
        "```bash\nls\n```\n\n!!! note\n    ```python\n    y = x + 1\n    ```\n"
    )
    path = tmp_path / "page.md"
    path.write_text(text, encoding="utf-8")
    blocks = python_blocks(path, tmp_path)
    assert [(b.code, b.skip) for b in blocks] == [
        ("x = 1\n", False),
        ("raise SystemExit\n", True),
        ("y = x + 1\n", False),
    ]


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="docs dependencies not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings", reason="docs dependencies not installed (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="docs dependencies not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material 9.7+ prints a notice about MkDocs 2
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--site-dir",
            str(site),
            "--config-file",
            str(ROOT / "mkdocs.yml"),
        ],
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
    _check_rendered_reference(site / "reference")


# Objects whose multi-line ``Returns:`` once rendered as one table row per line.
_ONE_RETURN = {
    "matching": ["maskalign.match_activations", "maskalign.match_weights"],
    "masks": [
        "maskalign.global_magnitude_prune",
        "maskalign.random_masks_like",
        "maskalign.enforce_masks",
        "maskalign.masks_from_prune",
    ],
    "spec": ["maskalign.check_equivalence"],
    "experiment": ["maskalign.repro.experiment.reproduce"],
}
_SECTION = re.compile(r'<span class="doc-section-title">(\w+):</span></p>\s*<table>(.*?)</table>', re.S)


def _object_html(page: str, anchor: str) -> str:
    start = page.index(f'id="{anchor}"')
    end = page.find('<div class="doc doc-object', start + 1)
    return page[start : end if end > 0 else None]


def _check_rendered_reference(reference: Path) -> None:
    """The three rendering faults of the API reference: a multi-line
    ``Returns:`` split into a row per line, signatures running off the page,
    and internal objects in the table of contents."""
    for name, anchors in _ONE_RETURN.items():
        page = (reference / name / "index.html").read_text(encoding="utf-8")
        for anchor in anchors:
            tables = dict(_SECTION.findall(_object_html(page, anchor)))
            assert "Returns" in tables, anchor
            assert tables["Returns"].count("<tr") == 2, f"{anchor}: Returns rendered as several rows"
    for page_path in sorted(reference.rglob("index.html")):
        page = page_path.read_text(encoding="utf-8")
        for block in re.findall(r'<div class="doc-signature[^"]*"[^>]*>(.*?)</div>', page, re.S):
            text = html.unescape(re.sub(r"<[^>]+>", "", block))
            longest = max(text.splitlines(), key=len)
            assert len(longest) <= 100, f"{page_path.parent.name}: signature line of {len(longest)} chars: {longest}"
        toc = re.findall(r'class="md-nav__link"[^>]*href="#([^"]+)"', page)
        internal = [t for t in toc if "ActivationStats" in t or any(p.startswith("_") for p in t.split("."))]
        assert not internal, f"{page_path.parent.name}: internal objects in the table of contents: {internal}"


# Links from error and warning messages into the docs: every docs page path
# written in the package's source (``f"{DOCS_URL}/troubleshooting/#maskerror"``,
# or a bare ``"how-to/prune-checkpoint/"`` joined to the URL elsewhere) must
# name an existing page and heading, so a message never sends a user to a 404.
TOP_LEVEL = sorted({p.relative_to(DOCS).parts[0].removesuffix(".md") for p in PAGES} - {"index"})
DOCS_LINK = re.compile(
    r"(?<![\w.-])(?P<page>(?:"
    + "|".join(map(re.escape, TOP_LEVEL))
    + r")(?:/[a-z0-9_-]+)*)/(?:#(?P<anchor>[\w-]+))?(?=[.,;:]?[\"'\s)]|$)"
)
HEADING = re.compile(r"^#{1,6}\s+(?P<text>.*?)\s*(?:\{\s*#(?P<id>[\w-]+)[^}]*\})?\s*$")


def _slug(text: str) -> str:
    """Python-Markdown's default ``toc`` slug of a heading."""
    import unicodedata

    text = re.sub(r"`|\*|_(?=\w)|(?<=\w)_", "", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def docs_anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            anchors.add(match["id"] or _slug(match["text"]))
    return anchors


def test_slug_matches_markdown() -> None:
    assert _slug("1. A's winning ticket by IMP") == "1-as-winning-ticket-by-imp"
    assert _slug("Bring a `torch.nn.utils.prune` checkpoint") == "bring-a-torchnnutilsprune-checkpoint"
    assert _slug("When capture fails: `TraceError`") == "when-capture-fails-traceerror"


def test_error_messages_link_to_existing_docs() -> None:
    links = []
    package = ROOT / "src" / "maskalign"
    for source in sorted(package.rglob("*.py")):
        for match in DOCS_LINK.finditer(source.read_text(encoding="utf-8")):
            links.append((str(source.relative_to(package)), match["page"], match["anchor"]))
    # the errors module builds every error's link: a regex that finds none is broken, not a pass
    assert any(source == "errors.py" for source, _, _ in links), "DOCS_LINK found no docs link in errors.py"
    broken = []
    for source, page, anchor in links:
        candidates = [DOCS / f"{page}.md", DOCS / page / "index.md"] if page else [DOCS / "index.md"]
        md = next((c for c in candidates if c.is_file()), None)
        if md is None or (anchor and anchor not in docs_anchors(md)):
            broken.append(f"{source}: {page}/#{anchor}")
    assert not broken, f"links to missing docs pages or anchors: {broken}"


def test_docstring_extension_rewrites_rst_idioms() -> None:
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import sphinx_roles
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    assert sphinx_roles.strip_roles("see :func:`validate_masks` and :class:`~maskalign.spec.Group`") == (
        "see `validate_masks` and `Group`"
    )
    assert sphinx_roles.strip_roles(":mod:`axis tree <maskalign.spec.axes>`") == "`axis tree`"
    text = "Levels.\n\n>>> f([0.5])\n[0.2, 0.5]\n\nExamples:\n    >>> 1 + 1\n    2\n"
    assert sphinx_roles.fence_doctests(text) == (
        "Levels.\n\n```pycon\n>>> f([0.5])\n[0.2, 0.5]\n```\n\nExamples:\n    >>> 1 + 1\n    2\n"
    )


# Shell commands of the docs (```bash blocks) are not run (installs, hour-long
# experiments), but they must stay valid: `maskalign` command lines parse with
# the real CLI, benchmark scripts exist and accept the flags shown, and every
# `pip install ".[extra]"` names an extra of pyproject.toml.
def shell_commands() -> list[tuple[str, str]]:
    commands = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        inside = False
        for line in lines:
            fence = FENCE.match(line)
            if fence and not inside:
                inside = (fence["info"].strip().split() or [""])[0] in ("bash", "sh", "console", "shell")
                continue
            if fence and inside:
                inside = False
                continue
            if inside:
                code = line.split(" #", 1)[0].strip()
                for part in filter(None, (p.strip() for p in code.split("&&"))):
                    commands.append((str(page.relative_to(DOCS)), part))
    return commands


def test_shell_commands_in_docs_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    from maskalign.repro.cli import main

    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover (Python 3.10)
        tomllib = pytest.importorskip("tomli")
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    seen = {"maskalign": 0, "benchmark": 0, "pip": 0}
    for page, command in shell_commands():
        words = shlex.split(command)
        if words[0] == "maskalign":
            seen["maskalign"] += 1
            with pytest.raises(SystemExit) as exit_info:
                main([*words[1:], "--help"])  # parses every flag before --help, runs nothing
            assert exit_info.value.code == 0, f"{page}: `{command}` does not parse: {capsys.readouterr().err}"
        elif words[0] == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
            seen["benchmark"] += 1
            script = ROOT / words[1]
            assert script.is_file(), f"{page}: `{command}`: no {words[1]}"
            source = script.read_text(encoding="utf-8")
            for flag in (w for w in words[2:] if w.startswith("--")):
                assert f'"{flag}"' in source, f"{page}: `{command}`: {words[1]} has no flag {flag}"
        elif words[:2] == ["pip", "install"]:
            seen["pip"] += 1
            for word in words[2:]:
                match = re.fullmatch(r"\.\[(?P<extras>[\w,-]+)\]", word)
                if match:
                    unknown = set(match["extras"].split(",")) - extras
                    assert not unknown, f"{page}: `{command}`: no extra(s) {unknown} in pyproject.toml"
    assert all(seen.values()), seen


@pytest.mark.slow
def test_docstring_examples_run() -> None:
    """The ``>>>`` examples in the package's docstrings (shown in the API reference)."""
    import doctest
    import importlib
    import pkgutil

    import maskalign

    attempted = 0
    for info in pkgutil.walk_packages(maskalign.__path__, prefix="maskalign."):
        module = importlib.import_module(info.name)
        result = doctest.testmod(module)
        assert result.failed == 0, info.name
        attempted += result.attempted
    assert attempted >= 1


# The main entry points carry a runnable ``Example:`` (executed by
# test_docstring_examples_run, shown in the API reference).
_ENTRY_POINTS = ("build_spec", "match_activations", "match_weights", "permute_mask", "transfer_mask", "enforce_masks")


@pytest.mark.parametrize("name", _ENTRY_POINTS)
def test_entry_points_have_a_runnable_example(name: str) -> None:
    import doctest

    import maskalign as ma

    function = getattr(ma, name)
    assert "\n    Example:\n" in (function.__doc__ or ""), name
    tests = doctest.DocTestFinder().find(function, name, globs={})
    examples = [e for t in tests for e in t.examples]
    assert len(examples) >= 3, name
    runner = doctest.DocTestRunner()
    for test in tests:
        runner.run(test)
    assert runner.failures == 0 and runner.tries == len(examples), name


def test_ci_runs_the_readme_commands_verbatim() -> None:
    """The README opens with two commands, the main job and the tests, and
    ``.ci/run`` runs exactly those (through ``.ci/readme_command.py``), the
    first with the quick preset appended."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import readme_command
    finally:
        sys.path.pop(0)
    first, second = readme_command.commands(ROOT / "README.md")
    assert first.endswith("&& maskalign reproduce") and second.endswith("&& python -m pytest -q")
    for command in (first, second):  # each makes and activates its venv, torch's CPU wheel first
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==")
    run = (ROOT / ".ci" / "run").read_text()
    assert 'bash -euo pipefail -c "$(python3 .ci/readme_command.py 1) --preset digits-quick' in run
    assert 'bash -euo pipefail -c "$(python3 .ci/readme_command.py 2)"' in run
    from maskalign.repro.presets import PRESETS

    assert "digits-quick" in PRESETS
