"""The few helpers every stage uses: file hashes, JSON-lines files, atomic text writes, library versions."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lite_ft import __version__

# Libraries whose behaviour the figures of a run depend on; their versions go into every metrics.json.
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept as is."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, value: Any) -> None:
    """Pretty-printed JSON, written to a temporary name and renamed: a reader never sees half a file."""
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
    os.replace(staging, path)


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of lite-ft and the libraries whose behaviour the figures depend on (plus `extra` packages)."""
    found = {}
    for name in (*LIBRARIES, *extra):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return {"lite-ft": __version__, **found}
