"""Score GGUF exports of a QA run through llama.cpp on the run's own eval questions, next to the run's score.

    pip install -e ".[gguf-check]"
    lite-ft merge runs/qa-lora --out exports/qa-lora-f16 --format gguf --gguf-type f16
    lite-ft merge runs/qa-lora --out exports/qa-lora-q4 --format gguf --gguf-type q4_k_m
    python benchmarks/gguf_eval.py runs/qa-lora exports/qa-lora-f16 exports/qa-lora-q4 --out benchmarks/results/gguf

Each prompt is the task's own (chat template, instruction, passage, question), rendered as text and tokenized by
llama.cpp; the reply is decoded greedily in llama.cpp (one thread, float32 KV cache) up to the recipe's
eval.max_new_tokens or an end-of-turn token, cut at its first line, and scored with lite-ft's SQuAD exact match
and F1. The reference is the run's metrics.json (the adapter on its base, which the merged export reproduces
exactly). Writes gguf_eval.json (per export: scores, difference, identical predictions, seconds) and gguf_eval.md.
About 2-4 s a question on 2 CPU cores for SmolLM2-135M.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from lite_ft.data.load import load_splits
from lite_ft.data.tasks import get_task
from lite_ft.data.tasks.causal import stop_ids
from lite_ft.export.llama_cpp import open_gguf, version
from lite_ft.metrics import qa_scores
from lite_ft.model import load_tokenizer
from lite_ft.recipe.load import load_recipe
from lite_ft.util import read_jsonl


def score(run_dir: Path, gguf_file: Path, limit: int | None) -> dict[str, Any]:
    """Scores of one GGUF file on the run's eval questions, and how its predictions compare with the run's."""
    recipe = load_recipe(run_dir / "recipe.yaml", environment=False)
    if recipe.task != "qa":
        raise SystemExit(f"{run_dir} is a {recipe.task} run; this script scores QA runs")
    tokenizer = load_tokenizer(str(run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir / "model"),
                               recipe)
    task = get_task("qa")
    examples = load_splits(recipe, task)[1].examples[:limit]
    stops = set(stop_ids(tokenizer))
    replies, mismatched, started = [], 0, time.perf_counter()
    with open_gguf(gguf_file, n_ctx=recipe.data.max_length + recipe.eval.max_new_tokens + 8) as engine:
        for example in examples:
            text = tokenizer.apply_chat_template(task.messages(example, recipe), tokenize=False,
                                                 add_generation_prompt=True)
            ids = engine.tokenize(text, add_special=False)
            mismatched += ids != task.prompt(example, tokenizer, recipe)
            new = engine.greedy(ids, recipe.eval.max_new_tokens, stops)
            replies.append(tokenizer.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip())
    seconds = time.perf_counter() - started
    scores = qa_scores(replies, [e["answers"] for e in examples])
    theirs = {p["id"]: p["prediction"] for p in read_jsonl(run_dir / "predictions.jsonl")}
    same = sum(theirs.get(e["id"]) == r for e, r in zip(examples, replies))
    return {"gguf": str(gguf_file), **_export_figures(gguf_file), "engine": version(), **scores,
            "seconds": round(seconds, 1),
            "same_prediction_as_run": same, "prompts_tokenized_differently": mismatched,
            "predictions": [{"id": e["id"], "prediction": r} for e, r in zip(examples, replies)]}


def _export_figures(gguf_file: Path) -> dict[str, Any]:
    """Type, size and llama.cpp check figures from the export.json beside the file (when lite-ft wrote it)."""
    path = gguf_file.parent / "export.json"
    if not path.is_file():
        return {"type": "?"}
    record = json.loads(path.read_text())
    check = record["gguf"].get("llama_cpp", {})
    return {"type": record["dtype"], "mib": round(record["gguf"]["bytes"] / 2**20), "check": {
        k: check[k] for k in ("top1_agreement", "same_next_token", "prompts", "relative_max_diff") if k in check},
        "perplexity": check.get("positions", {}).get("perplexity")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the run folder (recipe.yaml, metrics.json, predictions.jsonl)")
    parser.add_argument("exports", type=Path, nargs="+", help="export folders (model.gguf) or .gguf files")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N eval questions")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf"))
    args = parser.parse_args()
    reference = json.loads((args.run / "metrics.json").read_text())["eval"]
    rows = []
    for export in args.exports:
        row = score(args.run, export / "model.gguf" if export.is_dir() else export, args.limit)
        row["exact_match_minus_run"] = row["exact_match"] - reference["exact_match"]
        rows.append(row)
        print(f"{row['type']}: exact match {row['exact_match']:.2f} (run {reference['exact_match']:.2f}), F1 "
              f"{row['f1']:.2f} (run {reference['f1']:.2f}), {row['same_prediction_as_run']}/{row['n']} predictions "
              f"as the run's, {row['seconds']:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"run": str(args.run), "run_eval": reference, "limit": args.limit, "exports": rows}
    (args.out / "gguf_eval.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    (args.out / "gguf_eval.md").write_text(table(reference, rows), encoding="utf-8")


def table(reference: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The Markdown table of gguf_eval.md: the run's score, then each export's."""
    lines = ["| model | MiB | exact match | F1 | EM vs run | predictions as the run's | top-1 agreement (check) | "
             "perplexity (check) | seconds |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| run (adapter on its base, metrics.json) | | {reference['exact_match']:.2f} | {reference['f1']:.2f} | "
             "| | | | |"]
    for r in rows:
        top1 = f"{100 * r['check']['top1_agreement']:.1f}%" if r.get("check") else ""
        ppl = f"{r['perplexity']['gguf']:.2f} ({r['perplexity']['merged']:.2f})" if r.get("perplexity") else ""
        lines.append(f"| GGUF {r['type']} in {r['engine']} | {r.get('mib', '')} | {r['exact_match']:.2f} | "
                     f"{r['f1']:.2f} | {r['exact_match_minus_run']:+.2f} | {r['same_prediction_as_run']}/{r['n']} | "
                     f"{top1} | {ppl} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
