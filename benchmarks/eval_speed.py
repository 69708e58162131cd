"""QA eval speed: lite-ft's shared-prefix greedy decoding against transformers' generate (prompts sorted by length,
left-padded, the eval lite-ft had before), on the same model and questions; predictions must be identical.

    python benchmarks/eval_speed.py                        # SmolLM2-135M, 100 SQuAD validation questions
    python benchmarks/eval_speed.py --questions 50 --data builtin:qa-eval

Also splits the reference's time into prefill (the prompts' forward pass) and decode. Writes
benchmarks/results/eval-speed-cpu.{json,md}. Run it alone: it times CPU work.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from lite_ft.data.load import load_splits
from lite_ft.data.tasks import get_task
from lite_ft.data.tasks.causal import stop_ids
from lite_ft.data.tasks.generation import generate
from lite_ft.model import load_base, load_tokenizer
from lite_ft.recipe.load import load_recipe
from lite_ft.sources.resolve import resolve_source

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LITE_FT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def reference(model: Any, tokenizer: Any, prompts: list[list[int]], new: int, batch: int) -> dict[str, Any]:
    """transformers' generate over length-sorted, left-padded batches; prefill timed on its own as well."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    stops, pad = stop_ids(tokenizer), tokenizer.pad_token_id
    replies, prefill, total = [""] * len(prompts), 0.0, 0.0
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        ids, mask = _padded([prompts[i] for i in idx], pad)
        began = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        prefill += time.perf_counter() - began
        began = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=pad, eos_token_id=stops, temperature=None, top_p=None, top_k=None)
        total += time.perf_counter() - began
        for row, i in enumerate(idx):
            tokens = out[row, ids.shape[1]:].tolist()
            end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            replies[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()
    return {"replies": replies, "seconds": total, "prefill_seconds": prefill}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--data", default=str(SHARED / "squad_validation.jsonl"))
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval-speed-cpu"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(ROOT / "recipes" / "squad-lora.yaml",
                         [f"data.train={args.data}", f"data.eval={args.data}", f"data.limit_eval={args.questions}",
                          "data.limit_train=1"])
    task = get_task("qa")
    examples = load_splits(recipe, task)[1].examples
    source = resolve_source(recipe.model.source, False)
    tokenizer = load_tokenizer(source, recipe)
    model = load_base(source, recipe, torch.device("cpu"), torch.float32, None, tokenizer.pad_token_id).eval()
    prompts = [task.prompt(e, tokenizer, recipe) for e in examples]
    ref = reference(model, tokenizer, prompts, args.new_tokens, args.batch)
    began = time.perf_counter()
    ours = generate(model, tokenizer, prompts, args.new_tokens, args.batch, torch.device("cpu"))
    seconds = time.perf_counter() - began
    same = sum(a == b for a, b in zip(ours, ref["replies"]))
    result = {"questions": len(prompts), "data": args.data, "batch": args.batch, "max_new_tokens": args.new_tokens,
              "prompt_tokens": sum(map(len, prompts)), "threads": torch.get_num_threads(),
              "reference": {"seconds": ref["seconds"], "prefill_seconds": ref["prefill_seconds"],
                            "questions_per_second": len(prompts) / ref["seconds"]},
              "lite_ft": {"seconds": seconds, "questions_per_second": len(prompts) / seconds},
              "speedup": ref["seconds"] / seconds, "identical_predictions": same,
              "differing": [{"reference": b, "lite_ft": a} for a, b in zip(ours, ref["replies"]) if a != b]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    r, o = result["reference"], result["lite_ft"]
    table = ["| decoding | seconds | questions/s | of which prefill |", "| --- | --- | --- | --- |",
             f"| transformers generate, length-sorted batches | {r['seconds']:.1f} | {r['questions_per_second']:.2f} | "
             f"{r['prefill_seconds']:.1f} s |",
             f"| lite-ft shared-prefix decoding | {o['seconds']:.1f} | {o['questions_per_second']:.2f} | |", "",
             f"{len(prompts)} questions from {Path(args.data).name}, batch {args.batch}, up to {args.new_tokens} new "
             f"tokens, {result['threads']} threads: {result['speedup']:.2f}x, identical predictions {same} of "
             f"{len(prompts)}."]
    out.with_suffix(".md").write_text("\n".join(table) + "\n", encoding="utf-8")
    print("\n".join(table))


if __name__ == "__main__":
    main()
