"""The recipe-tuning table: one row per finished run folder, with what it changed from the shipped recipe, its
validation scores with 95% intervals (recomputed from predictions.jsonl with lite_ft.intervals) and its times.

    python benchmarks/tuning_table.py recipes/sst2-lora.yaml RUN_DIR [RUN_DIR ...] > table.md

Only train and validation data take part in tuning (../shared/data); nothing here reads any other split.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from lite_ft.intervals import describe, score_intervals
from lite_ft.metrics import SCORE_KEYS
from lite_ft.recipe.load import load_recipe
from lite_ft.util import read_jsonl

IGNORED = {"data.train", "data.eval", "output.dir", "train.save_every", "eval.baseline"}  # where, not what


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "fields":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def row(shipped: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What `folder`'s run changed from the shipped recipe, its scores with intervals, and its times."""
    trained = flat(yaml.safe_load((folder / "recipe.yaml").read_text(encoding="utf-8")))
    changed = {k: v for k, v in trained.items() if k not in IGNORED and shipped.get(k) != v}
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    records = read_jsonl(folder / "predictions.jsonl")
    task = metrics["task"]
    intervals = score_intervals(task, records)
    scores = {k: describe(metrics["eval"][k], intervals.get(k)) for k in SCORE_KEYS[task]}
    return {"run": folder.name, "changed": changed, "scores": scores, "n": len(records),
            "steps": metrics["train"]["steps"], "seconds_per_step": seconds_per_step(folder / "train_log.jsonl"),
            "eval_seconds": metrics["eval"].get("seconds")}


def seconds_per_step(log: Path) -> float:
    """Median seconds per step between consecutive log lines of train_log.jsonl. A run done in resumed pieces
    restarts its clock in each piece, so its own total cannot be summed from the log; the median ignores the
    piece boundaries."""
    entries = [e for e in read_jsonl(log) if "elapsed_s" in e and "loss" in e]
    rates = sorted((b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]) for a, b in zip(entries, entries[1:])
                   if b["step"] > a["step"] and b["elapsed_s"] > a["elapsed_s"])
    return rates[len(rates) // 2] if rates else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    shipped = flat(load_recipe(args.recipe).to_dict())
    rows = [row(shipped, Path(r)) for r in args.runs]
    keys = list(rows[0]["scores"])
    print("| run | changed from the shipped recipe | " + " | ".join(f"{k} [95% interval]" for k in keys)
          + " | n | training (steps x s/step) | eval |")
    print("| --- | --- | " + " | ".join("---" for _ in keys) + " | ---: | ---: | ---: |")
    for r in rows:
        changed = ", ".join(f"`{k}={v}`" for k, v in r["changed"].items()) or "(as shipped)"
        # Heavy jobs took turns on the CPU (a lock); short ones may have overlapped.
        train = f"{r['steps']} x {r['seconds_per_step']:.2f} s = {r['steps'] * r['seconds_per_step'] / 60:.1f} min"
        print(f"| {r['run']} | {changed} | " + " | ".join(r["scores"][k] for k in keys)
              + f" | {r['n']} | {train} | {r['eval_seconds'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
