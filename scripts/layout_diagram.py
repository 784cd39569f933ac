"""Regenerate the layout diagram of ``docs/concepts.md`` from the package's imports.

Every module of ``src/maskalign`` is a node, grouped by its folder (one folder
per concept); an arrow ``a --> b`` means that ``b`` imports ``a``, so arrows
follow the data: capture -> rules -> spec -> matching -> permutation -> masks
-> sparse training -> evaluation. Shared helpers (``errors``, ``_utils``) and
re-export modules (``__init__``, ``metrics``) are left out, and the drawing
keeps only the transitive reduction of the import graph (an arrow implied by
a longer path is dropped). ``tests/test_layout.py`` fails when the diagram in
the docs is not what this script writes.

    python scripts/layout_diagram.py           # rewrite docs/concepts.md in place
    python scripts/layout_diagram.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "maskalign"
DOC = ROOT / "docs" / "concepts.md"
BEGIN, END = "<!-- layout-diagram:begin -->", "<!-- layout-diagram:end -->"
LEFT_OUT = ("maskalign.errors", "maskalign._utils", "maskalign.metrics")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of the ``maskalign`` modules that ``path`` imports (anywhere in the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("maskalign"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("maskalign"))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (names resolved to existing modules)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in imports(path) if t in modules and t != name} for name, path in modules.items()}


def _drawn(name: str) -> bool:
    return not name.endswith("__init__") and name != "maskalign" and not name.startswith(LEFT_OUT)


def diagram() -> str:
    graph = import_graph()
    packages = {n for n in graph if (PACKAGE.parent / n.replace(".", "/") / "__init__.py").exists()}

    def through_packages(name: str) -> set[str]:
        """A package stands for the modules its ``__init__`` imports."""
        if name not in packages:
            return {name}
        return set().union(*(through_packages(d) for d in graph[name] if d.startswith(name + ".")), set())

    nodes = sorted(n for n in graph if _drawn(n) and n not in packages)
    edges = {(dep, n) for n in nodes for imported in graph[n] for dep in through_packages(imported) if dep in nodes}

    def reachable(start: str, skip: tuple[str, str]) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            here = todo.pop()
            for a, b in edges:
                if a == here and (a, b) != skip and b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    reduced = sorted((a, b) for a, b in edges if b not in reachable(a, (a, b)))
    ident = {n: n.removeprefix("maskalign.").replace(".", "_") for n in nodes}
    lines = ["```mermaid", "flowchart LR"]
    folders: dict[str, list[str]] = {}
    for n in nodes:
        rest = n.removeprefix("maskalign.")
        folders.setdefault(rest.split(".")[0] if "." in rest else "", []).append(n)
    for folder, members in sorted(folders.items()):
        indent = "  "
        if folder:
            lines.append(f"  subgraph {folder}/")
            indent = "    "
        for n in members:
            label = n.removeprefix(f"maskalign.{folder}.") if folder else n.removeprefix("maskalign.")
            lines.append(f'{indent}{ident[n]}["{label}"]')
        if folder:
            lines.append("  end")
    lines += [f"  {ident[a]} --> {ident[b]}" for a, b in reduced]
    lines.append("```")
    return "\n".join(lines)


def render(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{diagram()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/concepts.md is out of date")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"{DOC} has no {BEGIN} ... {END} block", file=sys.stderr)
        return 1
    new = render(text)
    if args.check:
        return int(new != text)
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
