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
from lite_ft.recipe.schema import SECTIONS, Recipe, result_keys
from lite_ft.training import sharding, writes
from lite_ft.training.distributed import launched_world
from lite_ft.util import sha256_file

MANIFEST = "manifest.json"
# Keys whose change alters the trained model or the data it sees, as the schema declares them; changing any of them
# refuses a resume. How the effective batch is split (micro-batch x accumulation) does not change what a step
# computes: its product counts instead of the two keys.
MATERIAL = (*result_keys(), "train.effective_batch")


def flatten(recipe: Recipe) -> dict[str, Any]:
    """Every recipe key as a flat {dotted key: value} mapping (`lora.r`, `data.fields`, ...)."""
    flat: dict[str, Any] = {}
    for key, value in recipe.to_dict().items():
        if isinstance(value, dict) and key in SECTIONS:
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    # Per optimizer step over all processes: 2 processes x 4 and 1 x 8 compute the same steps.
    flat["train.effective_batch"] = recipe.train.batch_size * recipe.train.grad_accum * launched_world()
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
    what = {"train.effective_batch": " (train.batch_size x train.grad_accum x processes: how it is split may "
                                     "change, not their product)"}
    return [f"{k}: {saved.get(k)!r} -> {now[k]!r}{what.get(k, '')}" for k in MATERIAL if saved.get(k) != now[k]]


@dataclass
class Checkpointing:
    """Where and how often the loop saves checkpoints, and the verified checkpoint to resume from."""

    folder: Path
    recipe: Recipe
    resume: Path | None = None
    data: dict[str, Any] | None = None  # the training data's fingerprint (rundir.data_fingerprint)


@dataclass
class Resumed:
    step: int
    real_tokens: int
    path: Path
    state: dict[str, Any]


def save(ck: Checkpointing, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         real_tokens: int, extra: dict[str, Any] | None = None, rng_states: list[dict[str, Any]] | None = None,
         trainable: dict[str, torch.Tensor] | None = None, optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step-NNNNNN` atomically and keep only the newest train.keep_checkpoints. Returns its path.

    A failure while writing (full disk, unwritable folder, whatever raised it) leaves the previous checkpoints
    untouched, removes the partial one and raises WriteFailed saying so. `extra` goes into state.json (the loop's
    figures, e.g. the last logged loss, for a run resumed after its last step). `rng_states`: every process's RNG
    state, in rank order (default: this process's). `trainable` and `optimizer_state`: full tensors gathered from
    sharded (FSDP) ranks, instead of this process's own.
    """
    folder, recipe, keep = ck.folder, ck.recipe, ck.recipe.train.keep_checkpoints
    final = folder / f"step-{step:06d}"

    def write(staging: Path) -> None:
        staging.mkdir()
        weights = trainable if trainable is not None else \
            {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file({n: t.contiguous() for n, t in weights.items()}, staging / "trainable.safetensors")
        opt = optimizer_state if optimizer_state is not None else optimizer.state_dict()
        torch.save({"optimizer": opt, "scheduler": scheduler.state_dict(), "sharded": optimizer_state is not None},
                   staging / "optimizer.pt")
        torch.save({"ranks": rng_states or [rng_state()]}, staging / "rng.pt")
        state = {"step": step, "real_tokens": real_tokens, "recipe_hash": recipe_hash(recipe),
                 "recipe": material(recipe), "data": ck.data, "world_size": len(rng_states or [None]),
                 **(extra or {})}
        (staging / "state.json").write_text(json.dumps(state, indent=2))
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        _write_synced(staging / MANIFEST, json.dumps(files, indent=2))

    previous = complete(folder)
    hint = (f"The previous checkpoints are intact ({', '.join(p.name for p in previous) or 'none'}). Free disk "
            f"space or fix the permissions of {folder}, then run the same command with --resume")
    writes.atomic_write(final, f"checkpoint {final.name}", write, hint,
                 needed_bytes=writes.folder_bytes(previous[-1]) if previous else None)
    for old in complete(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def state_of(path: Path) -> dict[str, Any]:
    """The state.json of a verified checkpoint: step, tokens, the recipe's result keys, the data fingerprint."""
    return json.loads((path / "state.json").read_text())


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


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0,
         sharded: bool = False) -> Resumed:
    """Restore trainable weights, optimizer, scheduler and RNG states from a verified checkpoint (`sharded`: into
    an FSDP model, from the full tensors the checkpoint holds)."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise LiteFTError(f"checkpoint {path} does not match the model: {len(missing)} trainable tensors missing "
                          f"(e.g. {missing[0]}); start again with --overwrite")
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    if opt.get("sharded", False) != sharded:
        raise LiteFTError(f"checkpoint {path} was written {'with' if opt.get('sharded') else 'without'} train.fsdp; "
                          "resume with the setting it was written with")
    if sharded:
        sharding.load_full(model, optimizer, weights, opt["optimizer"])
    else:
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    ranks = torch.load(path / "rng.pt", weights_only=False)["ranks"]  # our own file, verified by checksum
    _set_rng_state(ranks[min(rank, len(ranks) - 1)])  # another process count: not bit-identical, and recorded
    state = state_of(path)
    return Resumed(step=state["step"], real_tokens=state["real_tokens"], path=path, state=state)


def rng_state() -> dict[str, Any]:
    """This process's Python, torch (and CUDA) RNG states."""
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


BEST = "best"  # checkpoints/best/step-NNNNNN: the trainable weights of train.keep_best's best evaluation


def save_best(ck: Checkpointing, step: int, trainable: dict[str, torch.Tensor], value: dict[str, Any]) -> Path:
    """Write the best evaluation's trainable weights atomically, with a manifest, as checkpoints/best/step-NNNNNN.
    Older best folders are kept while a checkpoint still refers to them (a resume from it needs them)."""
    final = ck.folder / BEST / f"step-{step:06d}"

    def write(staging: Path) -> None:
        staging.mkdir()
        save_file({n: t.detach().to("cpu").contiguous() for n, t in trainable.items()},
                  staging / "trainable.safetensors")
        (staging / "state.json").write_text(json.dumps({"step": step, **value}, indent=2))
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        _write_synced(staging / MANIFEST, json.dumps(files, indent=2))

    writes.atomic_write(final, f"the best weights ({BEST}/{final.name})", write,
                        "The last checkpoint is intact: free disk space, then run the same command with --resume")
    prune_best(ck.folder, keep={step})
    return final


def prune_best(folder: Path, keep: set[int], after: int | None = None) -> None:
    """Remove best folders that neither `keep` nor any complete checkpoint refers to; with `after`, also those of
    steps past it (a resumed run trains those steps again and writes its own)."""
    referenced = set(keep)
    for path in complete(folder):
        best = (json.loads((path / "state.json").read_text()).get("tracking") or {}).get("best")
        if best:
            referenced.add(best["step"])
    for path in complete(folder / BEST):
        step = int(path.name.split("-")[1])
        if step not in referenced or (after is not None and step > after):
            shutil.rmtree(path, ignore_errors=True)


def load_best(folder: Path, step: int) -> dict[str, torch.Tensor]:
    """The trainable weights kept for `step`, verified against their manifest."""
    path = folder / BEST / f"step-{step:06d}"
    problem = verify(path) if path.is_dir() else "it is missing"
    if problem:
        raise LiteFTError(f"the best weights of step {step} ({path}) cannot be used: {problem}. Run again with "
                          "--overwrite, or without train.keep_best")
    return load_file(path / "trainable.safetensors")
