"""The run store: one JSON file per finished training run, so a lab run can resume.

A run's key is a hash of everything that decides its result (the ``TrainSpec``, the data
set's content fingerprint and the package version); its file is
``runs/<readable label>-<key>.json``. Files are written atomically (a temporary file in
the same folder, then ``os.replace``), so an interrupted lab leaves either the whole
result or nothing. ``fresh=True`` ignores the results stored before this store was made
(those it stores itself still count: two experiments that share a run train it once).
A stored file that cannot be read back (truncated, edited, from an incompatible version) is
reported through ``on_corrupt`` (a warning by default) and counts as missing: the run is
trained again and the file replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchnorm import __version__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class RunStore:
    """Finished runs under ``root/runs``, keyed by what decides them."""

    def __init__(self, root: Path, fresh: bool = False, on_corrupt: Callable[[str], None] | None = None):
        self.folder = Path(root) / "runs"
        self.fresh = fresh
        self.on_corrupt = on_corrupt or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
        self._written: set[Path] = set()

    @staticmethod
    def key(spec: dict, data_fingerprint: str) -> str:
        """A hash of the spec, the data and the package version."""
        text = json.dumps({"spec": spec, "data": data_fingerprint, "version": __version__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def path(self, label: str, key: str) -> Path:
        return self.folder / f"{label}-{key}.json"

    def get(self, label: str, key: str, parse: Callable[[dict], Any] = dict) -> Any:
        """``parse`` of the stored result (a JSON object), or None when there is none, when
        ``fresh`` asks to redo it, or when the file cannot be read or parsed (reported)."""
        path = self.path(label, key)
        if not path.is_file() or (self.fresh and path not in self._written):
            return None
        try:
            stored = json.loads(path.read_bytes())
            if not isinstance(stored, dict):
                raise ValueError(f"found a JSON {type(stored).__name__}")
            return parse(stored)
        except (OSError, ValueError, TypeError, KeyError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.on_corrupt(f"{path}: unreadable stored run ({type(e).__name__}: {e}); expected the JSON object of "
                            "a finished run: training it again")
            return None

    def put(self, label: str, key: str, result: dict) -> Path:
        """Store a finished run's result atomically; returns its file."""
        path = self.path(label, key)
        write_atomic(path, json.dumps(result))
        self._written.add(path)
        return path
