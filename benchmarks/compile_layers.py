"""torch.compile of the decoder layers (CPU inductor) against eager, on lite-ft's own LoRA training step: compile
time, steady seconds per forward + backward, and recompiles when the batch length changes.

    python benchmarks/compile_layers.py [--iterations 3] [--out benchmarks/results/levers-cpu]

SmolLM2-135M, recipes/squad-lora.yaml, the first two length-grouped SQuAD batches (two lengths, as training sees
them). Variants: eager with peft's path (train.fused_lora off), eager with the fused blocks (the default), and
each decoder layer compiled (`layer.compile()`) over peft's path (the fused blocks are autograd Functions with
Python-side weight access; dynamo would run them eagerly). Writes compile_layers.json and compile_layers.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import RECIPE, default_data_dir, encode_training_data, quiet_libraries

from lite_ft.data.batching import collate
from lite_ft.model import build
from lite_ft.recipe.load import load_recipe
from lite_ft.training import fused_lora
from lite_ft.training.loop import set_seed
from lite_ft.training.loss import batch_loss


def step_seconds(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Wall seconds of one forward + backward (gradients dropped after)."""
    started = time.perf_counter()
    loss, _ = batch_loss(model, batch, causal=True)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def run_variant(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], iterations: int
                ) -> dict[str, Any]:
    """First call on each batch shape (includes any compile), then `iterations` timed steps on each."""
    first = [step_seconds(model, b) for b in batches]
    steady = [step_seconds(model, b) for _ in range(iterations) for b in batches]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) * iterations
    return {"first_call_seconds": first, "steady_seconds": steady, "steady_tokens_per_second": tokens / sum(steady)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "levers-cpu"))
    args = parser.parse_args()
    quiet_libraries()
    data = default_data_dir()
    recipe = load_recipe(RECIPE, overrides=[f"data.train={data / 'squad_train.jsonl'}", "data.eval=null",
                                            "data.limit_train=400"])
    encoded = encode_training_data(recipe)
    set_seed(recipe.train.seed)
    built = build(recipe)
    model = built.model.train()
    batches = [collate([encoded.examples[i] for i in b], built.tokenizer.pad_token_id, True)
               for b in encoded.batches[:2]]
    results: dict[str, Any] = {"shapes": [list(b["input_ids"].shape) for b in batches],
                               "threads": torch.get_num_threads(), "torch": torch.__version__}
    for name, fused in (("eager, fused_lora off", False), ("eager, fused_lora on", True)):
        fused_lora.set_enabled(model, fused)
        results[name] = run_variant(model, batches, args.iterations)
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    fused_lora.set_enabled(model, False)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()  # inductor, CPU; dynamic shapes after the first recompile
    from torch._dynamo.utils import counters

    results["compiled layers, fused_lora off"] = run_variant(model, batches, args.iterations)
    results["compiled layers, fused_lora off"]["frames_compiled"] = dict(counters["stats"])
    print(json.dumps(results["compiled layers, fused_lora off"]), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_layers.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    base = results["eager, fused_lora off"]["steady_tokens_per_second"]
    lines = [f"# torch.compile of the decoder layers, SmolLM2-135M LoRA, batches {results['shapes']}", "",
             "| variant | first call on each shape, s | steady s per step | steady tok/s | vs eager peft |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in ("eager, fused_lora off", "eager, fused_lora on", "compiled layers, fused_lora off"):
        r = results[name]
        lines.append(f"| {name} | {', '.join(f'{s:.1f}' for s in r['first_call_seconds'])} | "
                     f"{sum(r['steady_seconds']) / len(r['steady_seconds']):.2f} | "
                     f"{r['steady_tokens_per_second']:.1f} | {r['steady_tokens_per_second'] / base:.2f}x |")
    lines += ["", f"Command: `python benchmarks/compile_layers.py --iterations {args.iterations}` "
              f"({results['threads']} threads, torch {results['torch']})", ""]
    (out / "compile_layers.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
