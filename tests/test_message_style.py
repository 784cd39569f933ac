"""One message style: every error and warning the package raises is a
sentence that starts with the culprit (capitalised, or a quoted name) and
ends with a full stop before the docs link. Checked on the source, so a new
message in the old style fails here before a user sees it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "maskalign"


def _text(node: ast.expr) -> str | None:
    """The literal text of a message; ``{}`` stands for each interpolated
    value; ``None`` when the message is not a literal (a variable)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _text(node.left), _text(node.right)
        return None if left is None or right is None else left + right
    return None


def messages(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of each literal message of a raised ``...Error`` /
    ``...Exception`` and of each ``warnings.warn`` in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        call = node.exc if isinstance(node, ast.Raise) else node
        if not isinstance(call, ast.Call) or not call.args:
            continue
        func = call.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if isinstance(node, ast.Raise) and not name.endswith(("Error", "Exception")):
            continue
        if not isinstance(node, ast.Raise) and name != "warn":
            continue
        text = _text(call.args[0])
        if text is not None and text.strip() != "{}":
            found.append((call.lineno, text.strip()))
    return found


def problem(text: str) -> str | None:
    """What is wrong with one message, or ``None``."""
    if " See {}" in text:  # a warning's docs link (errors get theirs from the class)
        text = text[: text.index(" See {}")]
    if text.endswith(".{}"):  # a "Did you mean ...?" suffix
        text = text[:-2]
    if not (text[:1].isupper() or text[:1] in "'\"`{"):
        return "does not start with the culprit (a capital letter or a quoted name)"
    if not text.endswith((".", "?", "!")):
        return "does not end with a full stop"
    return None


def test_the_checker_tells_the_styles_apart() -> None:
    code = (
        "raise ValueError(f'hidden must list a size, got {x}')\n"
        "raise MaskError(f\"Argument 'masks' is a {kind}; pass a dict.\")\n"
        "raise SpecError(f'{name!r} is unknown; pass one of {names}.{hint}')\n"
        "warnings.warn(f'Mask for {n} prunes every entry. See {DOCS}/x')\n"
        "raise TraceError(message)\n"
    )
    found = messages(code)
    assert [line for line, _ in found] == [1, 2, 3, 4]  # a variable message is not checked
    assert [problem(text) is None for _, text in found] == [False, True, True, True]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_message_is_a_sentence_that_starts_with_the_culprit(path: Path) -> None:
    bad = [f"line {line}: {problem(text)}: {text[:90]!r}" for line, text in messages(path.read_text()) if problem(text)]
    assert not bad, "\n".join(bad)


def test_the_package_has_messages_to_check() -> None:
    assert sum(len(messages(p.read_text())) for p in PACKAGE.rglob("*.py")) > 200
