"""The last ``settings.models_keep`` model versions on local disk (``<data_dir>/models``).

The models topic is the source of truth; this copy lets an operator inspect or roll back to a
version even after compaction removed it from the topic, and survives a broker wipe. Files are
``v<version:012d>.gfc`` (checkpoint bytes) plus ``v<version:012d>.json`` (summary), written
atomically (temp file + rename) so a crash never leaves a half-written version behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


@dataclass(frozen=True)
class StoredVersion:
    version: int
    path: Path
    size: int
    meta: dict


class ModelStore:
    def __init__(self, root: Path | str, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError("GRUFLOW_MODELS_KEEP must be >= 1")
        self.root = Path(root)
        self.keep = keep

    @classmethod
    def from_settings(cls, settings: Any) -> "ModelStore":
        return cls(Path(settings.process.data_dir) / "models", settings.trainer.models_keep)

    def _path(self, version: int, suffix: str) -> Path:
        return self.root / f"v{version:012d}{suffix}"

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def save(self, version: int, data: bytes, meta: dict | None = None) -> Path:
        """Write one version, then drop the oldest beyond ``keep``; returns the checkpoint path."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(version, ".gfc")
        self._write_atomic(path, data)
        self._write_atomic(self._path(version, ".json"), orjson.dumps({"version": version, "size": len(data),
                                                                        **(meta or {})}))
        self.prune()
        return path

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.glob("v*.gfc"):
            try:
                out.append(int(p.stem[1:]))
            except ValueError:
                continue
        return sorted(out)

    def list(self) -> list[StoredVersion]:
        out = []
        for v in self.versions():
            path = self._path(v, ".gfc")
            try:
                meta = orjson.loads(self._path(v, ".json").read_bytes())
            except (OSError, orjson.JSONDecodeError):
                meta = {}
            out.append(StoredVersion(v, path, path.stat().st_size, meta))
        return out

    def load(self, version: int) -> bytes | None:
        path = self._path(version, ".gfc")
        return path.read_bytes() if path.exists() else None

    def prune(self) -> list[int]:
        versions = self.versions()
        dropped = versions[: max(0, len(versions) - self.keep)]
        for v in dropped:
            self._path(v, ".gfc").unlink(missing_ok=True)
            self._path(v, ".json").unlink(missing_ok=True)
        return dropped
