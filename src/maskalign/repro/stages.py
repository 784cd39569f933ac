"""Resumable experiment stages: artifacts on disk plus a JSON manifest each.

A stage instance (e.g. ``dense/seed0-A``) lives in ``ROOT/stages/<stage>/<key>/``.
Its artifact files are written first, its ``manifest.json`` last, each one
atomically (:func:`maskalign._utils.fileio.atomic_write`), so a stage is finished
exactly when its manifest exists, and an interrupted run never leaves a
half-written file. The manifest records the values of exactly the settings the
stage depends on and their hash. On a later run:

* same hash: the stage is loaded, not recomputed;
* different hash: :class:`StageMismatchError` names the stage and every
  differing setting (old -> new), unless the store was opened with
  ``force=True``, in which case the stage is recomputed and overwritten;
* no manifest: the stage is computed.

Under ``torch.distributed`` (``maskalign reproduce`` under ``torchrun``) the
output folder must be one that every rank reads (on several nodes: a shared
file system). Only rank 0 reads manifests and writes: :meth:`StageStore.finished`
is rank 0's answer, broadcast (every rank loads or computes the same stages,
or raises the same :class:`StageMismatchError`); :meth:`StageStore.save_tensors`,
:meth:`StageStore.finish` and :meth:`StageStore.clear` write on rank 0 and the
other ranks wait for it, so that they can load what was written once the call
returns. :meth:`StageStore.finish` returns rank 0's record on every rank.
Every rank must make these calls in the same order (they are collectives);
:meth:`StageStore.lookup` is the local, collective-free check.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._utils.fileio import atomic_write
from ..errors import MaskAlignError
from . import distributed

__all__ = ["StageMismatchError", "StageStore", "settings_hash"]

_MANIFEST = "manifest.json"
_FORMAT = "maskalign.stage/1"


class StageMismatchError(MaskAlignError):
    """A finished stage in the output folder was computed with other settings
    than the current run's (so its artifacts must not be mixed in)."""

    docs_page = "troubleshooting/#stagemismatcherror"


def settings_hash(settings: Mapping[str, Any]) -> str:
    """SHA-256 (hex, 16 digits) of ``settings`` serialised as sorted JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` round-tripped through JSON (tuples become lists), so stored
    and current values compare equal."""
    return json.loads(json.dumps(dict(settings), sort_keys=True, default=str))


@dataclass
class StageStore:
    """Stage artifacts under ``root / "stages"``.

    Args:
        root: the run's output folder.
        force: recompute (and overwrite) stages whose settings differ instead
            of raising :class:`StageMismatchError`.
    """

    root: Path
    force: bool = False

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def folder(self, stage: str, key: str) -> Path:
        """``root/stages/<stage>/<key>``."""
        return self.root / "stages" / stage / key

    def path(self, stage: str, key: str, name: str) -> Path:
        """Path of artifact ``name`` of a stage instance."""
        return self.folder(stage, key) / name

    def clear(self) -> None:
        """Delete every stage (``root/stages``); other files are kept. Rank 0
        deletes, the others wait."""
        if distributed.is_main():
            shutil.rmtree(self.root / "stages", ignore_errors=True)
        distributed.barrier()

    def finished(self, stage: str, key: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored record (the ``data`` passed to :meth:`finish`) of a
        finished stage computed with ``settings``, or ``None`` if it has to be
        computed (not finished, or settings differ and ``force``). Under a
        process group: rank 0's answer on every rank (a collective).

        Raises:
            StageMismatchError: the stage finished with different settings
                (and not ``force``); the message lists each differing setting.
                Under a process group, raised on every rank.
        """
        if not distributed.is_distributed():
            return self.lookup(stage, key, settings)
        outcome: tuple[str, Any] = ("record", None)
        if distributed.is_main():
            try:
                outcome = ("record", self.lookup(stage, key, settings))
            except StageMismatchError as exc:
                outcome = ("mismatch", exc.message)
        kind, value = distributed.broadcast(outcome)
        if kind == "mismatch":
            raise StageMismatchError(value)
        return value

    def lookup(self, stage: str, key: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
        """:meth:`finished` as this process reads the folder, without asking
        the other ranks (:func:`plan_stages`, the progress display's plan).

        Raises:
            StageMismatchError: as :meth:`finished`.
        """
        manifest_path = self.path(stage, key, _MANIFEST)
        if not manifest_path.is_file():
            return None
        manifest = json.loads(manifest_path.read_text())
        current = _jsonable(settings)
        if manifest.get("format") == _FORMAT and manifest.get("hash") == settings_hash(current):
            return manifest["data"]
        if self.force:
            return None
        stored = manifest.get("settings", {})
        diffs = [
            f"{name}: {stored.get(name, '<absent>')!r} -> {current.get(name, '<absent>')!r}"
            for name in sorted(set(stored) | set(current))
            if stored.get(name) != current.get(name)
        ]
        raise StageMismatchError(
            f"Stage '{stage}/{key}' in {self.root} was computed with different settings "
            f"({'; '.join(diffs) or 'unknown format'}). Use another --out folder, or --force to "
            "recompute the stages whose settings changed, or --restart to discard every stage."
        )

    def save_tensors(self, stage: str, key: str, name: str, payload: Any) -> Path:
        """``torch.save`` ``payload`` atomically as artifact ``name``. Under a
        process group, rank 0 writes its ``payload`` and the others wait."""
        path = self.path(stage, key, name)
        if distributed.is_main():
            atomic_write(path, lambda handle: torch.save(payload, handle), mode="wb")
        distributed.barrier()
        return path

    def load_tensors(self, stage: str, key: str, name: str) -> Any:
        """Load artifact ``name`` (tensors and plain containers only,
        ``weights_only=True``) onto the CPU."""
        return torch.load(self.path(stage, key, name), map_location="cpu", weights_only=True)

    def finish(
        self, stage: str, key: str, settings: Mapping[str, Any], data: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """Mark a stage finished: write its manifest (settings, hash, the
        JSON-ready ``data``) atomically, after its artifacts. Returns ``data``
        as stored (JSON round trip), so fresh and resumed runs see identical
        values. Under a process group, rank 0 writes its ``data`` and every
        rank returns it (the others' ``data`` is not read: ``None`` will do)."""
        if not distributed.is_main():
            return distributed.broadcast({})
        if data is None:
            raise RuntimeError(f"Stage '{stage}/{key}' was finished without its record on rank 0.")
        current = _jsonable(settings)
        stored = json.loads(json.dumps(dict(data)))
        manifest = {
            "format": _FORMAT,
            "stage": stage,
            "key": key,
            "hash": settings_hash(current),
            "settings": current,
            "data": stored,
        }
        os.makedirs(self.folder(stage, key), exist_ok=True)
        atomic_write(self.path(stage, key, _MANIFEST), lambda h: json.dump(manifest, h, indent=1))
        return distributed.broadcast(stored)
