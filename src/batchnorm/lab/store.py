"""The run store: one JSON file per finished training run, so a lab run can resume.

A run's key is a hash of everything that decides its result (the ``TrainSpec``, the data
set's content fingerprint and the package version); its file is
``runs/<readable label>-<key>.json``. Files are written atomically (a temporary file in
the same folder, then ``os.replace``), so an interrupted lab leaves either the whole
result or nothing. ``fresh=True`` ignores the results stored before this store was made
(those it stores itself still count: two experiments that share a run train it once).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

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

    def __init__(self, root: Path, fresh: bool = False):
        self.folder = Path(root) / "runs"
        self.fresh = fresh
        self._written: set[Path] = set()

    @staticmethod
    def key(spec: dict, data_fingerprint: str) -> str:
        """A hash of the spec, the data and the package version."""
        text = json.dumps({"spec": spec, "data": data_fingerprint, "version": __version__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def path(self, label: str, key: str) -> Path:
        return self.folder / f"{label}-{key}.json"

    def get(self, label: str, key: str) -> dict | None:
        """The stored result, or None when there is none (or ``fresh`` asks to redo it)."""
        path = self.path(label, key)
        if not path.is_file() or (self.fresh and path not in self._written):
            return None
        return json.loads(path.read_text())

    def put(self, label: str, key: str, result: dict) -> Path:
        """Store a finished run's result atomically; returns its file."""
        path = self.path(label, key)
        write_atomic(path, json.dumps(result))
        self._written.add(path)
        return path
