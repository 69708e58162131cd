"""Checkpoints that survive crashes: written under a temporary name and renamed when complete, every file listed
with its sha256 in a manifest, so a checkpoint cut short (or damaged later) is never picked up.

A checkpoint holds the trainable weights, optimizer and scheduler state, RNG states, the data position (optimizer
steps done: the examples of each step depend only on the seed and the effective batch) and a hash of the resolved
recipe's keys that matter for the result.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lite_ft.errors import LiteFTError
from lite_ft.recipe.schema import SECTIONS, Recipe
from lite_ft.util import sha256_file

MANIFEST = "manifest.json"
# Keys whose change alters the trained model or the data it sees; changing any of them refuses a resume.
MATERIAL = ("task", "method", "model.source", "model.quantization", "model.dtype", "model.revision",
            "data.train", "data.eval", "data.train_split", "data.fields", "data.labels", "data.max_length",
            "data.limit_train", "data.holdout", "data.system_prompt", "lora.r", "lora.alpha", "lora.dropout",
            "lora.target_modules", "train.max_steps", "train.epochs", "train.effective_batch", "train.lr", "train.weight_decay", "train.warmup_ratio", "train.scheduler", "train.max_grad_norm",
            "train.seed", "train.optimizer", "train.group_by_length")
# How the effective batch is split (micro-batch x accumulation) does not change what a step computes.
SPLIT_KEYS = ("train.batch_size", "train.grad_accum")


def flatten(recipe: Recipe) -> dict[str, Any]:
    """Every recipe key as a flat {dotted key: value} mapping (`lora.r`, `data.fields`, ...)."""
    flat: dict[str, Any] = {}
    for key, value in recipe.to_dict().items():
        if isinstance(value, dict) and key in SECTIONS:
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    flat["train.effective_batch"] = recipe.train.batch_size * recipe.train.grad_accum
    return flat


def material(recipe: Recipe) -> dict[str, Any]:
    """The recipe's result-relevant keys as a flat {dotted key: value} mapping."""
    flat = flatten(recipe)
    return {key: flat[key] for key in MATERIAL}


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(json.dumps(material(recipe), sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(saved: dict[str, Any], recipe: Recipe) -> list[str]:
    """Material keys whose value differs between a saved run and `recipe`, as `key: old -> new`."""
    now = material(recipe)
    what = {"train.effective_batch": " (train.batch_size x train.grad_accum: how it is split may change, not "
                                     "their product)"}
    return [f"{k}: {saved.get(k)!r} -> {now[k]!r}{what.get(k, '')}" for k in MATERIAL if saved.get(k) != now[k]]


@dataclass
class Checkpointing:
    """Where and how often the loop saves checkpoints, and the verified checkpoint to resume from."""

    folder: Path
    recipe: Recipe
    resume: Path | None = None


@dataclass
class Resumed:
    step: int
    real_tokens: int
    path: Path


def save(ck: Checkpointing, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         real_tokens: int) -> Path:
    """Write checkpoint `step-NNNNNN` atomically and keep only the newest train.keep_checkpoints. Returns its path.

    A failure while writing (full disk, unwritable folder) leaves the previous checkpoints untouched and raises a
    LiteFTError that says so.
    """
    folder, recipe, keep = ck.folder, ck.recipe, ck.recipe.train.keep_checkpoints
    final = folder / f"step-{step:06d}"
    staging = folder / f".step-{step:06d}.partial"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, staging / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   staging / "optimizer.pt")
        torch.save(_rng_state(), staging / "rng.pt")
        state = {"step": step, "real_tokens": real_tokens,
                 "recipe_hash": recipe_hash(recipe), "recipe": material(recipe)}
        (staging / "state.json").write_text(json.dumps(state, indent=2))
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        _write_synced(staging / MANIFEST, json.dumps(files, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)  # atomic: a crash leaves either no checkpoint or a whole one
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        previous = ", ".join(p.name for p in complete(folder)) or "none"
        raise LiteFTError(f"could not write checkpoint {final} ({exc.strerror or exc}); the previous checkpoints "
                          f"are intact ({previous}). Free disk space or fix the permissions of {folder}, then "
                          "resume with --resume") from None
    for old in complete(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(folder: Path) -> list[Path]:
    """Finished checkpoints (renamed, with a manifest), oldest first. Partial ones are never listed."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file())


def verify(path: Path) -> str | None:
    """None if every file in the manifest is present with its sha256, else what is wrong."""
    try:
        files = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({exc})"
    for name, digest in files.items():
        target = path / name
        if not target.is_file():
            return f"{name} is missing"
        if sha256_file(target) != digest:
            return f"{name} does not match its checksum (truncated or damaged)"
    return None


def latest_valid(folder: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a note for each newer one skipped as damaged."""
    skipped = []
    for path in reversed(complete(folder)):
        problem = verify(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name}: {problem}")
    return None, skipped


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> Resumed:
    """Restore trainable weights, optimizer, scheduler and RNG states from a verified checkpoint."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise LiteFTError(f"checkpoint {path} does not match the model: {len(missing)} trainable tensors missing "
                          f"(e.g. {missing[0]}); start again with --overwrite")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))  # our own file, verified by checksum
    state = json.loads((path / "state.json").read_text())
    return Resumed(step=state["step"], real_tokens=state["real_tokens"], path=path)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if sys.platform != "win32":
        for p in path.parent.iterdir():  # make the other files durable before the rename publishes them
            if p.is_file() and p != path:
                with open(p, "rb") as g:
                    os.fsync(g.fileno())
