"""Every public function, class and method of ``maskalign.__all__`` and
``maskalign.metrics.__all__`` has complete Google-style docstring sections.

The rules, checked with :mod:`inspect` and a small section parser:

* ``Args:`` lists exactly the parameters of the signature, in order (``self``
  and ``cls`` left out; ``*args`` / ``**kwargs`` may be listed or described in
  the text). A class documents its ``__init__`` parameters in its own
  docstring (or its ``__init__``'s); a dataclass documents its fields in
  ``Attributes:`` instead (its ``__init__`` is generated from them).
* ``Returns:`` (or ``Yields:``) is there when the return annotation is not
  ``None``; ``__init__`` and properties (documented as attributes) are exempt.
* ``Raises:`` is there for every function and method with parameters
  (unless listed in ``_NO_RAISES``, with the reason), names only exception
  classes that exist (maskalign's typed errors or built-ins), and names every
  maskalign error the function raises itself or through the private helpers
  it calls (``_check_module`` and the like; followed within maskalign).
* A function or class that implements a published method says so in a
  ``Source:`` (or ``Sources:``) paragraph or section that names the paper
  (``_SOURCES``).
* Properties and public methods have a docstring at all.

Failures list what is missing, per object, so the fix is a docstring edit.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import re
import textwrap
from collections.abc import Callable, Iterator
from types import FunctionType, ModuleType
from typing import Any

import maskalign
import maskalign.errors as errors

SECTION = re.compile(r"^(?P<title>[A-Z][A-Za-z ]*):\s*$")
INLINE_SOURCE = re.compile(r"^Sources?:\s+(?P<text>\S.*)$")
ENTRY = re.compile(r"^(?P<name>\*{0,2}[A-Za-z_][A-Za-z0-9_]*)\s*(?:\([^)]*\))?\s*:(?:\s|$)")
ARGS_TITLES = ("Args", "Arguments", "Parameters")
RETURNS_TITLES = ("Returns", "Return", "Yields")

# Functions and classes that implement a published method: the paper their
# ``Source:`` section must name (a substring of it).
_SOURCES: dict[str, tuple[str, ...]] = {
    "maskalign.build_spec": ("Ainsworth",),
    "maskalign.PermutationSpec": ("Ainsworth",),
    "maskalign.match_activations": ("Ainsworth",),
    "maskalign.match_weights": ("Ainsworth",),
    "maskalign.permute_mask": ("Adnan",),
    "maskalign.permute_state_dict": ("Ainsworth",),
    "maskalign.apply_permutation": ("Ainsworth",),
    "maskalign.check_equivalence": ("Ainsworth",),
    "maskalign.global_magnitude_prune": ("Frankle",),
    "maskalign.iterative_magnitude_pruning": ("Frankle",),
    "maskalign.imp_schedule": ("Frankle",),
    "maskalign.interpolate": ("Frankle", "Entezari"),
    "maskalign.lmc_barrier": ("Frankle", "Entezari"),
    "maskalign.LMCResult": ("Frankle", "Entezari"),
    "maskalign.repair": ("Jordan",),
    "maskalign.reset_bn_stats": ("Jordan",),
    "maskalign.metrics.disagreement": ("Fort",),
    "maskalign.metrics.kl_divergence": ("Adnan",),
    "maskalign.metrics.js_divergence": ("Adnan",),
    "maskalign.metrics.ensemble_accuracy": ("Adnan",),
    "maskalign.metrics.diversity": ("Adnan", "Fort"),
    "maskalign.metrics.DiversityReport": ("Adnan",),
}

# Functions and methods with parameters that raise nothing of their own
# (every value they accept is valid): the reason, for the reviewer.
_ANY_ARGUMENT = "reads what the analysis passes it and accepts any value: no typed error"
_NO_RAISES: dict[str, str] = {
    "maskalign.MaskHandle.__init__": "made by enforce_masks, which validates the masks; it only stores them",
    "maskalign.MaskHandle.of": "any model is accepted; one without handles gives ()",
    "maskalign.RuleContext.__init__": "made by the analysis of build_spec; it only stores its arguments",
    "maskalign.RuleContext.value": "a constant, None or a node without a value gives None",
    "maskalign.RuleContext.dims": "a non-tensor argument gives None",
    "maskalign.RuleContext.meta": "a constant gives None",
    "maskalign.RuleContext.shape": "a non-tensor argument gives ()",
    "maskalign.RuleContext.arg": "a name the node does not pass gives the default",
    "maskalign.RuleContext.describe": _ANY_ARGUMENT,
    "maskalign.RuleContext.new": "a size of 1 or less gives []",
    "maskalign.RuleContext.fresh": "a size of 1 or less gives []",
    "maskalign.RuleContext.refine": "a dim that cannot be split is frozen, not refused",
    "maskalign.RuleContext.concat": _ANY_ARGUMENT,
    "maskalign.RuleContext.unify": "dims that cannot be joined are frozen, not refused",
    "maskalign.RuleContext.unify_dims": "dims that cannot be joined are frozen, not refused",
    "maskalign.RuleContext.freeze_dim": _ANY_ARGUMENT,
    "maskalign.RuleContext.freeze": _ANY_ARGUMENT,
}


# ------------------------------------------------------------------ parser
def sections(doc: str | None) -> dict[str, list[str]]:
    """The Google-style sections of a docstring: title -> the lines of its
    body, dedented (a title is a capitalised line ending in ``:`` at the
    docstring's own indentation, followed by an indented body)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    found: dict[str, list[str]] = {}
    i = 0
    while i < len(lines):
        inline = INLINE_SOURCE.match(lines[i])
        if inline:  # "Source: text ..." as a paragraph of its own
            body = [inline["text"]]
            i += 1
            while i < len(lines) and lines[i].strip():
                body.append(lines[i].strip())
                i += 1
            found["Source"] = body
            continue
        match = SECTION.match(lines[i])
        if match and i + 1 < len(lines) and lines[i + 1].startswith((" ", "\t")):
            body = []
            i += 1
            while i < len(lines) and (lines[i].startswith((" ", "\t")) or not lines[i].strip()):
                body.append(lines[i])
                i += 1
            title = "Source" if match["title"] == "Sources" else match["title"]
            found[title] = textwrap.dedent("\n".join(body)).strip("\n").splitlines()
            continue
        i += 1
    return found


def entries(body: list[str]) -> list[str]:
    """The names of the entries of an ``Args:`` / ``Raises:`` /
    ``Attributes:`` body (``name: text`` or ``name (type): text`` lines at
    the body's indentation; deeper lines continue the entry)."""
    names = []
    for line in body:
        if line[:1].isspace() or not line.strip():
            continue
        match = ENTRY.match(line)
        names.append(match["name"] if match else f"<unparsed: {line.strip()[:40]}>")
    return names


def section(found: dict[str, list[str]], titles: tuple[str, ...]) -> list[str] | None:
    return next((found[t] for t in titles if t in found), None)


# -------------------------------------------------------------- inventory
def _public_objects() -> Iterator[tuple[str, Any]]:
    seen: set[int] = set()
    for module, prefix in ((maskalign, "maskalign"), (maskalign.metrics, "maskalign.metrics")):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, ModuleType) or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{prefix}.{name}", obj


def _is_ours(obj: Any) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith("maskalign")


def _unwrap(obj: Any) -> Any:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return inspect.unwrap(obj)


def _members(cls: type) -> Iterator[tuple[str, str, Any]]:
    """``(name, kind, object)`` of the public methods and properties a class
    defines itself (inherited ones are checked on the class that defines them)."""
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, property):
            yield name, "property", raw
            continue
        func = _unwrap(raw)
        if isinstance(func, FunctionType) and _is_ours(func):
            yield name, "staticmethod" if isinstance(raw, staticmethod) else "method", func


def checked_objects() -> list[tuple[str, str, Any]]:
    """``(qualified name, kind, object)`` of everything the rules apply to."""
    out: list[tuple[str, str, Any]] = []
    for qualname, obj in _public_objects():
        if inspect.isclass(obj):
            out.append((qualname, "class", obj))
            for name, kind, member in _members(obj):
                out.append((f"{qualname}.{name}", kind, member))
        elif callable(obj):
            out.append((qualname, "function", _unwrap(obj)))
    return out


# ------------------------------------------------------------------ rules
def _parameters(func: Callable[..., Any], drop_first: bool) -> tuple[list[str], list[str]]:
    """The named parameters of ``func`` and its ``*args`` / ``**kwargs``."""
    params = list(inspect.signature(func).parameters.values())
    if drop_first and params and params[0].name in ("self", "cls"):
        params = params[1:]
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    star = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return named, star


def _check_args(documented: list[str] | None, named: list[str], star: list[str]) -> list[str]:
    if not named and not star:
        return [] if documented is None else ["Args: lists parameters but there are none"]
    if documented is None:
        return [f"Args: missing (parameters: {', '.join(named + star)})"] if named else []
    listed = [n.lstrip("*") for n in entries(documented)]
    problems = [f"Args: {n}" for n in listed if n.startswith("<unparsed")]
    listed = [n for n in listed if not n.startswith("<unparsed") and n not in star]
    missing = [n for n in named if n not in listed]
    extra = [n for n in listed if n not in named]
    if missing:
        problems.append(f"Args: missing {', '.join(missing)}")
    if extra:
        problems.append(f"Args: lists {', '.join(extra)}, not parameters")
    if not missing and not extra and listed != named:
        problems.append(f"Args: out of order ({', '.join(listed)}; signature: {', '.join(named)})")
    return problems


def _returns_something(func: Callable[..., Any]) -> bool:
    annotation = inspect.signature(func).return_annotation
    if annotation is inspect.Signature.empty:
        return any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(_tree(func)))
    return annotation not in (None, "None", "NoReturn", "typing.NoReturn")


def _tree(func: Callable[..., Any]) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(func)))


_ERRORS = {
    name: obj
    for name, obj in vars(errors).items()
    if inspect.isclass(obj) and issubclass(obj, errors.MaskAlignError) and not name.startswith("_")
}


def _raised_here(func: Callable[..., Any]) -> tuple[set[str], list[FunctionType]]:
    """The maskalign error classes raised in ``func``'s own body and the
    private maskalign functions it calls (resolved in its module)."""
    raised: set[str] = set()
    callees: list[FunctionType] = []
    scope = getattr(func, "__globals__", {})
    for node in ast.walk(_tree(func)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
            if name in _ERRORS:
                raised.add(name)
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else ""
            callee = scope.get(name)
            if name.startswith("_") and isinstance(callee, FunctionType) and _is_ours(callee):
                callees.append(callee)
    return raised, callees


def raised_errors(func: Callable[..., Any]) -> set[str]:
    """The maskalign errors ``func`` raises itself or through the private
    helpers it calls, followed transitively (public callees document their
    own)."""
    found: set[str] = set()
    todo: list[Callable[..., Any]] = [func]
    done: set[Callable[..., Any]] = set()
    while todo:
        current = todo.pop()
        if current in done:
            continue
        done.add(current)
        try:
            raised, callees = _raised_here(current)
        except (OSError, TypeError):  # no source
            continue
        found |= raised
        todo.extend(callees)
    return found


def _check_raises(qualname: str, func: Callable[..., Any], documented: list[str] | None, has_params: bool) -> list[str]:
    needed = raised_errors(func)
    if documented is None:
        if needed:
            return [f"Raises: missing (raises {', '.join(sorted(needed))})"]
        if has_params and qualname not in _NO_RAISES:
            return ["Raises: missing"]
        return []
    listed = entries(documented)
    problems = [f"Raises: {n}" for n in listed if n.startswith("<unparsed")]
    unknown = [n for n in listed if not n.startswith("<") and n not in _ERRORS and not hasattr(builtins, n)]
    if unknown:
        problems.append(f"Raises: lists {', '.join(unknown)}, not an exception class")
    # a documented base class covers its subclasses
    covered = {n for n in needed for d in listed if d in _ERRORS and issubclass(_ERRORS[n], _ERRORS[d])}
    if needed - covered:
        problems.append(f"Raises: does not list {', '.join(sorted(needed - covered))}")
    return problems


def _check_source(qualname: str, found: dict[str, list[str]]) -> list[str]:
    papers = _SOURCES.get(qualname)
    if not papers:
        return []
    if "Source" not in found:
        return [f"Source: missing (expected to name {' / '.join(papers)})"]
    text = " ".join(found["Source"])
    absent = [p for p in papers if p not in text]
    return [f"Source: does not name {', '.join(absent)}"] if absent else []


def problems_of(qualname: str, kind: str, obj: Any) -> list[str]:
    if kind == "property":
        return [] if (obj.fget.__doc__ or "").strip() else ["no docstring"]
    doc = obj.__doc__ if kind != "class" or obj.__doc__ is not None else None
    if not (doc or "").strip():
        return ["no docstring"]
    found = sections(doc)
    problems = _check_source(qualname, found)
    if kind == "class":
        if dataclasses.is_dataclass(obj):
            fields = [f.name for f in dataclasses.fields(obj) if f.init]
            documented = found.get("Attributes")
            if documented is None:
                problems.append(f"Attributes: missing (fields: {', '.join(fields)})")
            else:
                listed = entries(documented)
                missing = [f for f in fields if f not in listed]
                if missing:
                    problems.append(f"Attributes: missing {', '.join(missing)}")
            return problems
        init = vars(obj).get("__init__")
        if init is None or not _is_ours(init):
            return problems  # the inherited constructor is documented where it is defined
        init_doc = sections(init.__doc__)
        documented = section(found, ARGS_TITLES)
        if documented is None:
            documented = section(init_doc, ARGS_TITLES)
        named, star = _parameters(init, drop_first=True)
        problems += _check_args(documented, named, star)
        raises = found.get("Raises", init_doc.get("Raises"))
        problems += _check_raises(f"{qualname}.__init__", init, raises, bool(named or star))
        return problems
    named, star = _parameters(obj, drop_first=kind == "method")
    problems += _check_args(section(found, ARGS_TITLES), named, star)
    if _returns_something(obj) and section(found, RETURNS_TITLES) is None:
        problems.append("Returns: missing")
    problems += _check_raises(qualname, obj, found.get("Raises"), bool(named or star))
    return problems


OBJECTS = checked_objects()


# ------------------------------------------------------------------ tests
def test_parser() -> None:
    doc = """Summary.

    Text with a colon: not a section.

    Args:
        x: ``(N, C)`` logits; continued
            on a second line.
        y (int): a count.
        **kwargs: passed on.

    Returns:
        A fraction in ``[0, 1]``.

    Raises:
        DataError: ``x`` is empty.
        ArgumentTypeError: (a ``TypeError``) ``y`` is not an int.

    Source:
        Fort et al. 2019.
    """
    found = sections(doc)
    assert list(found) == ["Args", "Returns", "Raises", "Source"]
    assert sections("Summary.\n\nSources: Frankle & Carbin, ICLR 2019;\nFrankle et al., ICML 2020.\n") == {
        "Source": ["Frankle & Carbin, ICLR 2019;", "Frankle et al., ICML 2020."]
    }
    assert entries(found["Args"]) == ["x", "y", "**kwargs"]
    assert entries(found["Raises"]) == ["DataError", "ArgumentTypeError"]
    assert _check_args(found["Args"], ["x", "y"], ["kwargs"]) == []
    assert _check_args(found["Args"], ["y", "x"], ["kwargs"]) == ["Args: out of order (x, y; signature: y, x)"]
    assert _check_args(found["Args"], ["x", "z"], ["kwargs"]) == ["Args: missing z", "Args: lists y, not parameters"]
    assert _check_args(found["Args"], ["x", "y"], []) == ["Args: lists kwargs, not parameters"]
    assert _check_args(None, ["x"], []) == ["Args: missing (parameters: x)"]


def test_raised_errors_follow_private_helpers() -> None:
    from maskalign.evaluation.lmc import interpolate

    found = raised_errors(interpolate)
    # _check_module and _check_alpha (ArgumentTypeError), _check_alpha (ArgumentValueError),
    # _same_tensors (SpecMismatchError)
    assert {"ArgumentTypeError", "ArgumentValueError", "SpecMismatchError"} <= found


def test_inventory_covers_the_public_api() -> None:
    names = {q for q, _, _ in OBJECTS}
    for name in ("maskalign.build_spec", "maskalign.Permutation", "maskalign.metrics.diversity"):
        assert name in names
    assert all(name.startswith("maskalign.") for name in _SOURCES)
    assert set(_SOURCES) <= names, set(_SOURCES) - names
    assert {name.removesuffix(".__init__") for name in _NO_RAISES} <= names
    assert len(OBJECTS) >= 50


def test_every_public_object_has_complete_sections() -> None:
    report = []
    for qualname, kind, obj in OBJECTS:
        problems = problems_of(qualname, kind, obj)
        if problems:
            report.append(f"{qualname} ({kind}): " + "; ".join(problems))
    assert not report, f"{len(report)} of {len(OBJECTS)} objects lack docstring sections:\n" + "\n".join(report)
