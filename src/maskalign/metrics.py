"""Ensemble diversity metrics, kept at ``maskalign.metrics``; defined in
:mod:`maskalign.evaluation.metrics`."""

from .evaluation.metrics import *  # noqa: F403
from .evaluation.metrics import __all__ as __all__
