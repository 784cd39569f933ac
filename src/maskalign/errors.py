"""Typed errors raised by maskalign.

Every error names its culprit (a parameter, a graph node, a tensor shape, an
argument) and says what to do, so that a user can act on it without reading
our source. Its message ends with a link to the troubleshooting entry of its
class. Errors about bad values also subclass :class:`ValueError` and errors
about wrong types :class:`TypeError`, so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "DOCS_URL",
    "MaskAlignError",
    "ArgumentError",
    "ArgumentTypeError",
    "ArgumentValueError",
    "ConfigError",
    "UnknownPresetError",
    "MissingFileError",
    "TraceError",
    "SpecError",
    "SpecMismatchError",
    "MaskError",
    "DataError",
]


DOCS_URL = "https://maskalign.readthedocs.io/en/latest"
"""Root of the documentation site; messages link to pages under it."""


class MaskAlignError(Exception):
    """Base class of every error raised by maskalign.

    The message ends with a link to the troubleshooting entry of the error's
    class (``docs_page``, a page path under :data:`DOCS_URL`).
    """

    docs_page: ClassVar[str] = "troubleshooting/"

    @property
    def message(self) -> str:
        """The message without the documentation link."""
        return BaseException.__str__(self)  # not KeyError.__str__, which would quote it

    @property
    def docs_link(self) -> str:
        """The address of this error's troubleshooting entry."""
        return f"{DOCS_URL}/{self.docs_page}"

    def one_line(self) -> str:
        """Message and link on one line (what the command line prints).

        Returns:
            The message followed by ``See <link>``, with every run of
            whitespace (newlines included) collapsed to one space.
        """
        return " ".join(f"{self.message} See {self.docs_link}".split())

    def __str__(self) -> str:
        return f"{self.message}\nSee {self.docs_link}"


class ArgumentError(MaskAlignError):
    """An argument of a public function is unusable: the message names the
    argument, what it got and what to pass instead. Raised as one of its two
    subclasses, :class:`ArgumentTypeError` and :class:`ArgumentValueError`."""

    docs_page = "troubleshooting/#argumenterror"


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument is of the wrong kind: a ``DataLoader`` where a model is
    expected (swapped arguments), a ``state_dict`` instead of a module, a list
    of pairs or ``None`` instead of a mask dict, a one-shot iterator where the
    data is read several times, a value that is not callable where a function
    is expected. Also a :class:`TypeError`."""

    docs_page = "troubleshooting/#argumenttypeerror"


class ArgumentValueError(ArgumentError, ValueError):
    """An argument has the right type but a value the function does not
    accept: a sparsity outside ``[0, 1)`` (or a percentage such as ``90``),
    an unknown option name, a count below its minimum, a ``state_dict`` with
    other keys than the model's. Also a :class:`ValueError`."""

    docs_page = "troubleshooting/#argumentvalueerror"


class ConfigError(ArgumentValueError):
    """A setting of the reproduction experiment (``maskalign reproduce``, a
    preset override, :class:`~maskalign.repro.presets.ReproduceConfig`) is out of
    range or inconsistent, or the requested device is not available."""

    docs_page = "troubleshooting/#configerror"


class UnknownPresetError(ConfigError, KeyError):
    """:func:`~maskalign.repro.presets.get_preset` got a name that is not a preset.
    Also a :class:`KeyError` (and, as a :class:`ConfigError`, a
    :class:`ValueError`)."""

    docs_page = "troubleshooting/#unknownpreseterror"


class MissingFileError(ArgumentError, FileNotFoundError):
    """A file or folder the caller named does not exist. Also a
    :class:`FileNotFoundError`."""

    docs_page = "troubleshooting/#missingfileerror"


class TraceError(MaskAlignError):
    """A model could not be captured as a ``torch.fx`` graph, or the captured
    graph does not reproduce the eager model on the example inputs."""

    docs_page = "troubleshooting/#traceerror"


class SpecError(MaskAlignError, ValueError):
    """A permutation spec, or a permutation, is inconsistent with a model.
    Also a :class:`ValueError`."""

    docs_page = "troubleshooting/#specerror"


class SpecMismatchError(SpecError):
    """Two models (or a model and a permutation) do not share one
    architecture: different parameter names or shapes; or two models to be
    matched sit on different devices or hold their weights in different
    dtypes."""

    docs_page = "troubleshooting/#specmismatcherror"


class MaskError(MaskAlignError, ValueError):
    """A pruning mask is malformed: unknown parameter, wrong shape, non-boolean
    values, a sparse-layout tensor, or a mask that removes a whole layer."""

    docs_page = "troubleshooting/#maskerror"


class DataError(MaskAlignError, ValueError):
    """Data passed to a matcher or an evaluation is empty, malformed, or
    produced non-finite values; or a model's weights are not finite."""

    docs_page = "troubleshooting/#dataerror"


# ------------------------------------------------------------- helpers
# Shared by the modules that check their arguments, so that every message
# has one wording.


def _did_you_mean(name: object, known: Iterable[str]) -> str:
    """``" Did you mean: 'a', 'b'?"`` for up to three names of ``known`` close
    to ``name`` (``difflib``), or ``""``."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else ""


def _describe(value: object) -> str:
    """A short description of ``value`` for messages: the value itself when it
    is a number or a short string, else its kind (``a list of 2 items``, ``a
    tensor of shape (3, 4)``, ``a DataLoader``)."""
    if value is None or isinstance(value, (bool, int, float, complex)):
        return repr(value)
    if isinstance(value, (str, bytes)):
        text = repr(value)
        return f"the {type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
    if isinstance(value, torch.Tensor):
        layout = "" if value.layout == torch.strided else f" {value.layout}"
        return f"a{layout} tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    kind = type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"{article} {kind} of {len(value)} item{'s' if len(value) != 1 else ''}"
    return f"{article} {kind}"


def _check_module(value: Any, argument: str, call: str = "") -> None:
    """Raise :class:`ArgumentTypeError` unless ``value`` is an ``nn.Module``.

    The message names ``argument``; for a ``state_dict`` it says to load it
    into a model, and ``call`` (e.g. ``"match_activations(model_a, model_b,
    data)"``) is quoted as the expected argument order.
    """
    if isinstance(value, nn.Module):
        return
    if isinstance(value, Mapping):
        hint = "; it looks like a state_dict or a mask set: load it into a model with model.load_state_dict(...)"
    else:
        hint = ""
    order = f"; the order is {call}" if call else ""
    raise ArgumentTypeError(f"Argument {argument!r} is {_describe(value)}, not an nn.Module{hint}{order}.")


def _check_callable(value: Any, argument: str, signature: str) -> None:
    """Raise :class:`ArgumentTypeError` unless ``value`` is callable;
    ``signature`` shows how it is called (``"train_fn(model, round)"``)."""
    if not callable(value):
        raise ArgumentTypeError(
            f"Argument {argument!r} is {_describe(value)}, not a function; pass a callable {signature}."
        )


def _check_choice(value: Any, argument: str, choices: Iterable[str]) -> None:
    """Raise :class:`ArgumentValueError` unless ``value`` is one of ``choices``
    (close names are suggested)."""
    options = list(choices)
    if isinstance(value, str) and value in options:
        return
    listed = ", ".join(repr(c) for c in options)
    raise ArgumentValueError(
        f"Argument {argument!r} is {value!r}; pass one of {listed}.{_did_you_mean(value, options)}"
    )


def _check_int(value: Any, argument: str, minimum: int, *, allow_none: bool = False) -> None:
    """Raise :class:`ArgumentTypeError` unless ``value`` is an ``int`` (not a
    ``bool``; ``None`` only with ``allow_none``), and
    :class:`ArgumentValueError` if it is below ``minimum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"Argument {argument!r} is {_describe(value)}; pass an int >= {minimum}.")
    if value < minimum:
        raise ArgumentValueError(f"Argument {argument!r} is {value}; pass an int >= {minimum}.")


def _check_reusable(value: Any, argument: str) -> None:
    """Raise :class:`ArgumentTypeError` if ``value`` is a one-shot iterator
    (a generator, ``iter(loader)``) where the data is read more than once."""
    if isinstance(value, Iterator):
        raise ArgumentTypeError(
            f"Argument {argument!r} is a one-shot iterator ({type(value).__name__}) but it is read more than "
            "once; pass a list of batches or a DataLoader."
        )


def _check_fraction(value: Any, argument: str, *, include_zero: bool) -> float:
    """``value`` as a float, checked to be a fraction in ``[0, 1)`` (or
    ``(0, 1)`` without ``include_zero``).

    Raises:
        ArgumentTypeError: ``value`` is not a real number (a string, ``None``).
        ArgumentValueError: it is outside the interval; a value in ``[2, 100]``
            is called a likely percentage and the fraction is suggested.
    """
    interval = "[0, 1)" if include_zero else "(0, 1)"
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"Argument {argument!r} is {_describe(value)}; pass a number in {interval}.")
    number = float(value)
    low_ok = number >= 0.0 if include_zero else number > 0.0
    if low_ok and number < 1.0:
        return number
    if 2.0 <= number <= 100.0:
        raise ArgumentValueError(
            f"Argument {argument!r} is {value!r}, which looks like a percentage; pass {number / 100:g} "
            f"({argument} is a fraction in {interval})."
        )
    raise ArgumentValueError(f"Argument {argument!r} is {value!r}; pass a fraction in {interval}.")
