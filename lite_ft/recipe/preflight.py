"""Checks of this machine that a recipe needs before it can run: its data files exist, the packages its method
needs import. They are separate from the schema (recipe.load) so that a saved recipe can be read back anywhere, and
they run only for the commands that use them. Devices and dtypes are resolved in recipe.precision.

Nothing here imports torch: `lite-ft validate` stays fast.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from lite_ft.recipe.schema import Recipe

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# The trackers output.report_to takes and the packages each needs (any one of them); mirrors training.trackers,
# spelled out here so that `lite-ft validate` does not import accelerate and torch.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


def check_environment(r: Recipe, problems: list[str]) -> None:
    """Append a problem for every data file that is missing and every package the recipe needs that is absent."""
    q = r.model.quantization
    if r.method == "qlora" or q in ("8bit", "4bit") or r.train.optimizer == "adamw8bit":
        reason = bitsandbytes_problem()
        if reason:
            problems.append(f"method {r.method} / model.quantization {q} / train.optimizer {r.train.optimizer} need "
                            f"bitsandbytes, which does not import here ({reason}); pip install bitsandbytes, or use "
                            "method lora with model.quantization none and train.optimizer adamw")
    if r.model.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        problems.append("model.attention: 'flash_attention_2' needs the flash-attn package (CUDA GPUs only), which is "
                        "not installed; pip install flash-attn, or use sdpa (PyTorch's fused attention)")
    for name in r.output.report_to:
        packages = TRACKER_PACKAGES.get(name)
        if packages is None:
            problems.append(f"output.report_to: {name!r} is not a tracker lite-ft knows; use tensorboard, wandb or "
                            "mlflow")
        elif not any(importlib.util.find_spec(p) for p in packages):
            problems.append(f"output.report_to: {name} needs the {packages[0]} package, which is not installed; "
                            f"pip install {packages[0]}, or remove it from output.report_to")
    for key in ("train", "eval"):
        path = getattr(r.data, key)
        if path and looks_like_file(path) and not _exists(path):
            problems.append(f"data.{key}: file {path!r} not found (relative paths start from {os.getcwd()}); fix the "
                            "path, or use a Hub dataset id or builtin:NAME")


def bitsandbytes_problem() -> str | None:
    """None when bitsandbytes imports, else why not. The import is here, not at the top: it takes about a second
    and only quantized methods and the 8-bit optimizer need it."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # an import can fail in many ways on unusual platforms
        return str(exc)
    return None


def looks_like_file(path: str) -> bool:
    """A data source written as a file path (a known suffix, or starting with . / ~), not a Hub id."""
    return path.lower().endswith(DATA_SUFFIXES) or path.startswith((".", "/", "~"))


def _exists(path: str) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):  # a name too long for the file system, or a NUL byte
        return False


def absolute_paths(r: Recipe) -> Recipe:
    """The recipe with its local paths (data files, a model folder or .gguf file, output.dir) made absolute, so
    that the run folder's recipe.yaml means the same from any working directory."""
    def absolute(path: str | None) -> str | None:
        return str(Path(path).expanduser().resolve()) if path else path

    data = {k: absolute(getattr(r.data, k)) for k in ("train", "eval")
            if getattr(r.data, k) and looks_like_file(getattr(r.data, k))}
    source = r.model.source
    local = looks_like_file(source) or source.lower().endswith(".gguf") or _exists(source)
    return dataclasses.replace(
        r, data=dataclasses.replace(r.data, **data),
        model=dataclasses.replace(r.model, source=absolute(source) if local else source),
        output=dataclasses.replace(r.output, dir=absolute(r.output.dir)))
