"""GPU check of the precision policy and the one loop: a random-initialised Llama of about 1B parameters in bf16,
3 optimizer steps each of full fine-tuning, LoRA and QLoRA, through lite-ft's own build and training loop.

Per method it prints and writes (JSON) the CUDA peak (allocated and reserved), tokens/s, and the loss of step 1
next to an fp32 reference of the same step (same weights, same batch). The plan grid (issue #15): for each method
at micro-batch 4 and 8, `lite-ft plan`'s CUDA prediction, made before the model is built, against the measured
`max_memory_reserved` (the plan's peak less its assumed context, CUDA_CONTEXT_MIB). Needs no network: the model is built from a
config and the tokenizer is trained on lite-ft's built-in texts. About 3-6 minutes on one H200.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu] [--size 1b|tiny]

`--size tiny` runs the same code on a 2-layer model, on the CPU too, to check the script itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny offline tokenizer builder the tests use

SIZES = {  # TinyLlama-1.1B's shape (1.03B parameters with this vocabulary); and a 2-layer one to check the script
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
METHODS = ("full", "lora", "qlora")


def make_model_dir(size: str, folder: Path) -> Path:
    from conftest import _asset_texts, build_llama_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_llama_tokenizer(_asset_texts())
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, **SIZES[size])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)  # fp32 on disk: the reference loads it exactly, bf16 runs cast it
    tokenizer.save_pretrained(folder)
    return folder


def recipe_for(model_dir: Path, method: str, dtype: str, out: Path, device: str, batch: int = 8) -> Any:
    from lite_ft.recipe.load import load_recipe

    return load_recipe(document={
        "task": "qa", "method": method, "model": {"source": str(model_dir), "dtype": dtype},
        "data": {"train": "builtin:qa-train", "eval": None, "limit_train": 64, "max_length": 512},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"max_steps": 3, "batch_size": batch, "lr": 2e-5 if method == "full" else 2e-4, "log_every": 1,
                  "warmup_ratio": 0.0, "device": device, "save_every": 0},
        "output": {"dir": str(out), "save_model": False}})


def train_method(recipe: Any) -> dict[str, Any]:
    """Build and train through lite-ft's own code; the CUDA peaks are of this method alone."""
    from lite_ft.data.load import load_splits
    from lite_ft.data.tasks import get_task
    from lite_ft.model import build, count_params
    from lite_ft.recipe.precision import place
    from lite_ft.training.loop import set_seed, train
    from lite_ft.training.memory import MemoryMonitor

    placement = place(recipe)
    cuda = placement.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    set_seed(0)
    built = build(recipe, placement)
    task = get_task("qa")
    examples = load_splits(recipe, task)[0].examples
    encoded = [e for e in (task.encode(x, built.tokenizer, recipe) for x in examples) if e is not None]
    log = Path(recipe.output.dir) / "train_log.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with MemoryMonitor(placement.device) as monitor:
        stats = train(built.model, encoded, recipe.train, pad_id=built.tokenizer.pad_token_id, causal=True,
                      precision=placement.precision, monitor=monitor, log_path=log)
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    row = {"losses": losses, "tokens_per_second": stats["tokens_per_second"],
           "seconds_per_step": stats["seconds_per_step"], "precision": stats["precision"],
           "loss_path": stats["loss_path"].get("path"), "params": count_params(built.model)}
    if cuda:
        torch.cuda.synchronize()
        row.update(peak_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
                   peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20)
    del built
    return row


def plan_row(recipe: Any, device: str) -> dict[str, Any]:
    """The plan's prediction for `recipe` (no weights loaded), then the run; on CUDA the error of the predicted
    reserved peak (the plan's peak less its assumed context) against the measured one."""
    from lite_ft.plan.predict import CUDA_CONTEXT_MIB, predict

    plan = predict(recipe, "cuda" if device == "cuda" else "cpu", gpu_memory_mib=140 * 1024, speed=False)
    row = {"predicted_peak_mib": plan["peak_mib"], "parts": plan["parts"],
           "longest_micro_batch": plan["longest_micro_batch"]}
    measured = train_method(recipe)
    if "peak_reserved_mib" in measured:
        predicted = plan["peak_mib"] - CUDA_CONTEXT_MIB
        row.update(predicted_reserved_mib=predicted, measured_reserved_mib=measured["peak_reserved_mib"],
                   error_pct=100 * (predicted - measured["peak_reserved_mib"]) / measured["peak_reserved_mib"])
    return row


def plan_grid(model_dir: Path, methods: list[str], half: str, device: str, tmp: Path) -> dict[str, Any]:
    """The plan against the measured peak for every method at micro-batch 4 and 8."""
    grid = {}
    for method in methods:
        for batch in (4, 8):
            row = plan_row(recipe_for(model_dir, method, half, tmp / f"plan-{method}-{batch}", device, batch), device)
            grid[f"{method}-b{batch}"] = row
            error = f", error {row['error_pct']:+.1f}%" if "error_pct" in row else " (no CUDA: nothing to compare)"
            print(f"plan {method} batch {batch}: predicted {row['predicted_peak_mib']:,.0f} MiB{error}", flush=True)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu")
    parser.add_argument("--size", choices=SIZES, default="1b")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-plan", action="store_true", help="skip the plan grid (predicted vs measured peaks)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.size != "tiny":
        sys.exit("no CUDA GPU here: run with --size tiny to check the script on the CPU")
    half = "bfloat16" if device == "cuda" else "float32"  # bf16 matmuls crawl on most CPUs
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {"size": args.size, "device": torch.cuda.get_device_name() if device == "cuda" else
                               "cpu", "torch": torch.__version__, "methods": {}}
    with tempfile.TemporaryDirectory(prefix="lite-ft-gpu-check-") as tmp:
        model_dir = make_model_dir(args.size, Path(tmp) / "model")
        for method in args.methods.split(","):
            row = train_method(recipe_for(model_dir, method, half, Path(tmp) / method, device))
            reference = train_method(recipe_for(model_dir, method, "float32", Path(tmp) / f"{method}-fp32", device))
            row["fp32_step1_loss"] = reference["losses"][0]
            row["step1_relative_difference"] = abs(row["losses"][0] - reference["losses"][0]) / reference["losses"][0]
            row["fp32_peak_reserved_mib"] = reference.get("peak_reserved_mib")
            results["methods"][method] = row
            print(describe(method, row), flush=True)
        if not args.no_plan:
            results["plan_grid"] = plan_grid(model_dir, args.methods.split(","), half, device, Path(tmp))
    results["wall_seconds"] = time.time() - started
    (args.out / f"gpu_check-{args.size}.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / f'gpu_check-{args.size}.json'} ({results['wall_seconds']:.0f} s)")


def describe(method: str, row: dict[str, Any]) -> str:
    peaks = (f"peak allocated {row['peak_allocated_mib']:.0f} MiB, reserved {row['peak_reserved_mib']:.0f} MiB, "
             if "peak_allocated_mib" in row else "")
    return (f"{method:6} {row['params'][0]:,} of {row['params'][1]:,} trained; {peaks}{row['tokens_per_second']:.0f} "
            f"tok/s; step-1 loss {row['losses'][0]:.4f} vs fp32 {row['fp32_step1_loss']:.4f} "
            f"(rel {row['step1_relative_difference']:.2e}); precision {row['precision']}")


if __name__ == "__main__":
    main()
