"""Model inputs as positional arguments for ``forward``."""

from __future__ import annotations

from typing import Any

__all__ = ["normalize_inputs"]


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Positional arguments for ``forward``: a tensor becomes a 1-tuple, a list
    becomes a tuple, a tuple is kept."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)
