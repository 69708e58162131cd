"""model.source -> something `from_pretrained` loads: a catalog name is fetched, a GGUF file converted once into a
cached safetensors folder, a local folder checked, a Hub id checked for reachability."""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lite_ft.errors import LiteFTError
from lite_ft.sources import catalog
from lite_ft.sources.hub import require_hub

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def resolve_source(source: str, allow_pickle: bool = False) -> str:
    """Turn model.source into something from_pretrained takes: a local folder or a reachable Hub id."""
    if source in catalog.CATALOG:
        source = str(catalog.fetch(source))
    path = Path(source).expanduser()
    if source.lower().endswith(".gguf"):
        if not path.is_file():
            raise LiteFTError(f"model.source: GGUF file {source} not found")
        return str(convert_gguf(path))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise LiteFTError(f"model.source: {source} is not a model folder (no config.json in it); point it at a "
                              "folder written by save_pretrained, a .gguf file, a Hub id or a catalog name")
        check_weights(path, allow_pickle)
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise LiteFTError(f"model.source: {source} does not exist; use an existing folder, a .gguf file, a Hub id "
                          f"or a catalog name ({', '.join(catalog.CATALOG)})")
    require_hub(source, "model", f"catalog models work offline: {', '.join(catalog.CATALOG)}")
    return source


def check_weights(folder: Path, allow_pickle: bool) -> None:
    """Refuse a folder whose weights exist only as pickle files, unless the recipe allows pickle."""
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in names) or allow_pickle:
        return
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise LiteFTError(f"model.source: {folder} holds weights only in pickle format (.bin/.pt), which can run "
                          "arbitrary code when loaded; convert them to safetensors, or set model.allow_pickle true "
                          "if you trust the files")


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder (so bitsandbytes can quantize it later)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = catalog.cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file() and (target / ".complete").exists():
        return target
    with catalog.cache_lock(target):
        if (target / "config.json").is_file() and (target / ".complete").exists():  # converted meanwhile
            return target
        return _convert(path, target)


def _convert(path: Path, target: Path) -> Path:
    print(f"lite-ft: converting {path.name} to safetensors (once; cached in {target}) ...", file=sys.stderr,
          flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (struct.error, EOFError, OSError, IndexError) as exc:  # what a cut-short header or tensor table raises
        raise LiteFTError(f"model.source: {path.name} is not a complete GGUF file ({type(exc).__name__}: {exc}); "
                          "it may be cut short by an interrupted download: download it again") from None
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LiteFTError(f"model.source: cannot load {path.name} through transformers' GGUF support ({exc}); "
                          "its architecture may not be supported there, or the file is damaged") from None
    # The dequantized weights are ordinary tensors; drop the GGUF marker so the folder loads like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / ".complete").write_text(str(path.resolve()) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
