"""The package layout: one folder per concept, the library apart from the
paper-reproduction application, the public API of 0.1 unchanged, no import
cycles between concepts, and the docs' layout diagram generated from the
imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import maskalign as ma

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import layout_diagram  # noqa: E402

# Every public name of maskalign 0.1 (its __all__): a user's code keeps working.
NAMES_0_1 = """ArgumentError ArgumentTypeError ArgumentValueError ConfigError DataError EquivalenceReport
IMPResult IMPRound LMCResult MaskAlignError MaskError MaskHandle MissingFileError Permutation PermutationSpec
RuleContext SpecError SpecMismatchError TraceError apply_masks apply_permutation assert_masked build_spec
check_same_architecture check_equivalence enforce_masks global_magnitude_prune imp_schedule interpolate
iterative_magnitude_pruning lmc_barrier match_activations masks_from_prune match_weights metrics permute_mask
permute_state_dict random_masks_like random_permutation register_rule repair reset_bn_stats sparsity
state_dict_from_prune to_prune validate_masks""".split()

CONCEPTS = ("spec", "matching", "sparse", "evaluation", "repro", "_utils")


def _concept(module: str) -> str:
    """``maskalign.spec.rules.core`` -> ``spec``; top-level modules are their own concept."""
    return module.split(".")[1] if "." in module else "maskalign"


def test_public_api_of_0_1_is_unchanged() -> None:
    assert set(NAMES_0_1) <= set(ma.__all__)
    for name in NAMES_0_1:
        assert getattr(ma, name) is not None, name
    import maskalign.metrics
    import maskalign.models

    assert maskalign.metrics.diversity is ma.metrics.diversity
    assert callable(maskalign.models.ResNet20)


def test_one_folder_per_concept() -> None:
    package = ROOT / "src" / "maskalign"
    for folder in CONCEPTS:
        assert (package / folder / "__init__.py").is_file(), folder
    top_level = sorted(p.name for p in package.glob("*.py"))
    # at the top: the API, `python -m maskalign` (the command line of repro), errors, the
    # permutation itself, the models, and the metrics alias
    assert top_level == ["__init__.py", "__main__.py", "errors.py", "metrics.py", "models.py", "permutation.py"]


@pytest.mark.slow  # a subprocess imports the package
def test_the_library_never_imports_the_application() -> None:
    graph = layout_diagram.import_graph()
    offenders = {
        (module, dep)
        for module, deps in graph.items()
        if not module.startswith(("maskalign.repro", "maskalign.__main__"))  # the application and its entry
        for dep in deps
        if dep.startswith("maskalign.repro")
    }
    assert not offenders
    # and at run time: importing the library loads nothing of repro
    code = "import sys, maskalign; print(sorted(m for m in sys.modules if m.startswith('maskalign.repro')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_import_graph_sees_every_import() -> None:
    """The checks above are only as good as the import scan: it must see a
    lazy import inside a function and a relative import two levels up."""
    graph = layout_diagram.import_graph()
    assert "maskalign.spec.permutation_spec" in graph["maskalign.permutation"]
    assert "maskalign.spec.atoms" in graph["maskalign.spec.rules.registry"]  # from ..atoms
    assert "maskalign.repro.experiment" in graph["maskalign.repro.cli"]
    assert {"maskalign.matching.activation", "maskalign.matching.weight"} <= set().union(*graph.values())


def test_concepts_form_no_import_cycle() -> None:
    graph = layout_diagram.import_graph()
    edges: dict[str, set[str]] = {}
    for module, deps in graph.items():
        for dep in deps:
            a, b = _concept(module), _concept(dep)
            if a != b and a != "maskalign" and not module.endswith(("maskalign", "maskalign.metrics")):
                edges.setdefault(a, set()).add(b)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            here, path = stack.pop()
            for nxt in edges.get(here, ()):
                if nxt == start:
                    return [*path, nxt]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for c in (cycle_from(n) for n in edges) if c]
    assert not cycles, cycles


@pytest.mark.slow  # a subprocess imports the package
def test_every_module_imports_on_its_own() -> None:
    """No module works only because another was imported first (a hidden
    cycle): each is imported first into a fresh copy of the package."""
    modules = sorted(layout_diagram.import_graph())
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'maskalign' or m.startswith('maskalign.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        f"print(len({modules!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) == len(modules) > 30


@pytest.mark.slow
def test_docs_layout_diagram_is_generated_from_the_imports() -> None:
    text = (ROOT / "docs" / "concepts.md").read_text()
    assert layout_diagram.BEGIN in text
    assert layout_diagram.render(text) == text, "run `python scripts/layout_diagram.py` to update docs/concepts.md"
    # the arrows follow the data from the graph to the evaluation
    diagram = layout_diagram.diagram()
    for edge in (
        "spec_capture --> spec_rules_analysis",
        "spec_permutation_spec --> permutation",
        "permutation --> matching_mask_aware",
        "matching_mask_aware --> matching_activation",
        "sparse_masks --> sparse_enforce",
    ):
        assert edge in diagram


def test_library_code_has_no_assert() -> None:
    """``python -O`` strips asserts: validation and control flow raise typed errors instead."""
    import ast

    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in sorted((ROOT / "src" / "maskalign").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert) or (isinstance(node, ast.Raise) and "AssertionError" in ast.dump(node))
    ]
    assert not found, found
