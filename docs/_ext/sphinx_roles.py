"""Griffe extension for the docs build: render reStructuredText idioms of
maskalign's docstrings as Markdown.

* Sphinx roles (``:func:`name```, ``:class:`~pkg.Name```, ``:mod:``,
  ``:data:``, ``:meth:``, ``:attr:``, ``:exc:``) become inline code; without
  this they show literally (":func:`validate_masks`").
* Doctest blocks (``>>>`` lines and their output, up to a blank line) outside
  an ``Examples:`` section become fenced ``pycon`` code; without this an
  output line such as ``[0.2, 0.36]`` is read as a Markdown link.

Only the rendered text changes; the docstrings themselves are not touched.
Loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# :role:`target`, :role:`~a.b.target` (show the last part), :role:`text <target>`
_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|exc|obj|const):`(?P<body>[^`]+)`")


def _replace(match: re.Match[str]) -> str:
    body = match["body"].strip()
    explicit = re.fullmatch(r"(?P<text>.+?)\s*<(?P<target>[^>]+)>", body)
    if explicit:
        return f"`{explicit['text']}`"
    if body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]
    return f"`{body}`"


def strip_roles(text: str) -> str:
    return _ROLE.sub(_replace, text)


_SECTION = re.compile(r"^\s*[A-Z][A-Za-z ]*:\s*$")


def fence_doctests(text: str) -> str:
    """Wrap doctest blocks that are not inside an ``Examples:`` section
    (where griffe already renders them) in a fenced ``pycon`` block."""
    lines = text.split("\n")
    out: list[str] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SECTION.match(line) and not line.startswith((" ", "\t")):
            section = line.strip()
        starts_block = line.lstrip().startswith(">>>") and (i == 0 or not lines[i - 1].strip())
        if starts_block and section != "Examples:":
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += [f"{indent}```pycon", *block, f"{indent}```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles and bare doctest blocks in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(strip_roles(obj.docstring.value))
