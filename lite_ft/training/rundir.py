"""The run folder (output.dir): decide whether a run starts afresh, resumes, or is refused.

A folder holding a different run is never written over without --overwrite; an unfinished run of the same recipe
resumes from its last good checkpoint; a changed recipe is refused with the keys that changed.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lite_ft.errors import DataChanged, LiteFTError
from lite_ft.recipe.load import load_recipe
from lite_ft.recipe.schema import Recipe
from lite_ft.training import checkpoint
from lite_ft.training.distributed import launched_world

ARTIFACTS = ("metrics.json", "predictions.jsonl", "train_log.jsonl", "memory.json", "recipe.yaml", "adapter",
             "model", "checkpoints", "data_report.json", "baseline_eval.json")


@dataclass
class Plan:
    """What `run` does with the folder: resume from `resume` (None: start afresh), and why."""

    resume: Path | None = None
    notes: list[str] = field(default_factory=list)
    harmless_changes: list[str] = field(default_factory=list)


def prepare(out: Path, recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Plan:
    """Check output.dir against the recipe and the flags; clear it when --overwrite is given."""
    if resume and overwrite:
        raise LiteFTError("--resume and --overwrite contradict each other: pick one")
    held = [name for name in ARTIFACTS if (out / name).exists()]
    if overwrite:
        for name in held:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        return Plan(notes=[f"--overwrite: removed {', '.join(held)}"] if held else [])
    if not held:
        if resume:
            raise LiteFTError(f"--resume: {out} holds no run to resume; run without --resume to start one")
        return Plan()
    results = [n for n in ("metrics.json", "adapter", "model") if (out / n).exists()]
    if not results and not checkpoint.complete(out / "checkpoints"):
        # An attempt that stopped before its first checkpoint (bad data, a crash while loading) has nothing to keep.
        if resume:
            raise LiteFTError(f"--resume: {out} holds no checkpoint to resume from; run without --resume")
        return Plan(notes=[f"an earlier attempt left no checkpoint or results ({', '.join(held)}): starting afresh"])
    saved = _saved_recipe(out)
    if saved is None:
        raise LiteFTError(f"output.dir {out} holds files of another run ({', '.join(held)}) but no readable "
                          "recipe.yaml; use --overwrite to replace them or choose another output.dir")
    changed = checkpoint.changed_keys(_saved_material(out, saved), recipe)
    if changed:
        verb = "cannot resume" if resume else f"output.dir {out} holds a different run"
        raise LiteFTError(f"{verb}: the recipe changed in keys that matter:\n    " + "\n    ".join(changed)
                          + "\nRestore them, use --overwrite to start afresh, or choose another output.dir.")
    if (out / "metrics.json").exists():
        raise LiteFTError(f"output.dir {out} holds a finished run of this recipe; use --overwrite to run it again, "
                          "or choose another output.dir")
    plan = Plan(harmless_changes=_harmless(saved, recipe))
    path, damaged = checkpoint.latest_valid(out / "checkpoints")
    plan.notes += [f"skipped damaged checkpoint {d}" for d in damaged]
    if path is None:
        plan.notes.append("the unfinished run left no usable checkpoint: starting afresh")
    else:
        plan.resume = path
        plan.notes.append(f"resuming from {path}")
        written_by = checkpoint.state_of(path).get("world_size", 1)
        if written_by != launched_world():  # allowed: the effective batch (counted over processes) is unchanged
            plan.notes.append(f"resumed on {launched_world()} process(es) from a checkpoint written by {written_by}: "
                              "the same steps, but not bit-identical (other random streams and summation order)")
    return plan


def _saved_recipe(out: Path) -> Recipe | None:
    try:
        document = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
        return load_recipe(document=document, environment=False)
    except (OSError, yaml.YAMLError, LiteFTError, AttributeError):
        return None


def _saved_material(out: Path, saved: Recipe) -> dict[str, Any]:
    """The result keys the run was trained with: from its newest checkpoint, which counted its own processes in
    train.effective_batch; else from its recipe.yaml."""
    newest = checkpoint.complete(out / "checkpoints")
    if newest:
        try:
            recorded = checkpoint.state_of(newest[-1]).get("recipe")
        except (OSError, ValueError):
            recorded = None
        if recorded and "train.effective_batch" in recorded:
            return recorded
    return checkpoint.material(saved)


def _harmless(saved: Recipe, recipe: Recipe) -> list[str]:
    """Changed keys that do not alter the result (logging interval, eval batch, the split of the effective
    batch, ...), as `key: old -> new`."""
    old, new = checkpoint.flatten(saved), checkpoint.flatten(recipe)
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(new)
            if k not in checkpoint.MATERIAL and old.get(k) != new[k]]


def check_data(plan: Plan, data: dict[str, Any], allow_change: bool) -> None:
    """Refuse to resume on training data that differs from the checkpoint's (edited texts or labels), naming the
    file, unless `allow_change`; then the change is recorded in the plan's notes."""
    if plan.resume is None:
        return
    saved = checkpoint.state_of(plan.resume).get("data") or {}
    if not saved or saved.get("sha256") == data["sha256"]:
        return
    was = f"{saved.get('examples')} examples, sha256 {str(saved.get('sha256'))[:12]}"
    now = f"{data['examples']} examples, sha256 {data['sha256'][:12]}"
    if not allow_change:
        raise DataChanged(f"cannot resume: the training data {data['source']} changed since {plan.resume.name} "
                          f"({was} then, {now} now). Restore it, start afresh with --overwrite, or resume anyway "
                          "with --resume --allow-data-change")
    plan.notes.append(f"--allow-data-change: resumed on changed training data {data['source']} ({was} -> {now})")


def record(plan: Plan) -> dict[str, Any]:
    """The resume facts for metrics.json."""
    return {"resumed_from": str(plan.resume) if plan.resume else None, "notes": plan.notes,
            "harmless_changes": plan.harmless_changes}
