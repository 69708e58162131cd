"""What autograd keeps for the backward pass, per token and decoder layer, with and without train.fused_lora; and
the live-tensor peak of a training step (what the tensors themselves need, against which RSS is judged).

    python benchmarks/saved_bytes.py [--method lora] [--batches 3] [--out benchmarks/results/levers-cpu]

SmolLM2-135M on lite-ft's own first length-grouped SQuAD batches (recipes/squad-lora.yaml: batch 8, max_length 384,
LoRA r16 all-linear, dropout 0). Saved tensors are counted with torch.autograd.graph.saved_tensors_hooks, each
storage once, model parameters left out, and charged to the decoder layer whose forward saved it. The live-tensor
peak comes from the PyTorch profiler's allocation events over one forward + backward + optimizer step, plus the
tensors alive before it (weights, gradients, optimizer state). Writes saved_bytes.json and saved_bytes.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import MIB, RECIPE, default_data_dir, encode_training_data, quiet_libraries

from lite_ft.data.batching import collate
from lite_ft.model import build
from lite_ft.recipe.load import load_recipe
from lite_ft.training import fused_lora
from lite_ft.training.loop import set_seed
from lite_ft.training.loss import batch_loss
from lite_ft.training.memory import tensor_bytes


def saved_by_layer(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Bytes autograd saves in one forward, per decoder layer (and outside the layers), each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    current: list[int | None] = [None]
    owner: dict[int, tuple[int | None, int]] = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in owner:
            owner[ptr] = (current[0], storage.nbytes())
        return t

    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = batch_loss(model, batch, causal=True)
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    per_layer = [sum(b for o, b in owner.values() if o == i) for i in range(len(layers))]
    return {"layers": len(layers), "per_layer_bytes": per_layer,
            "outside_layers_bytes": sum(b for o, b in owner.values() if o is None)}


def live_peak(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
              ) -> dict[str, float]:
    """Peak bytes of live tensors over one training step, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    before = tensor_bytes(model, optimizer)
    resident = (sum(before["frozen_weights"].values()) + before["trainable"] + before["gradients"]
                + before["optimizer"]) * MIB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = batch_loss(model, batch, causal=True)
        loss.backward()
        optimizer.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    level = high = 0
    for _, nbytes in events:  # each allocation (+) and free (-), in time order
        level += nbytes
        high = max(high, level)
    if not events:
        raise RuntimeError("the profiler recorded no allocation events; no live-tensor peak")
    return {"resident_before_mib": resident / MIB, "step_peak_above_mib": high / MIB,
            "live_peak_mib": (resident + high) / MIB}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    data = default_data_dir()
    overrides = [f"method={args.method}", f"data.train={data / 'squad_train.jsonl'}", "data.eval=null",
                 f"data.limit_train={args.examples}"]
    recipe = load_recipe(RECIPE, overrides=overrides)
    encoded = encode_training_data(recipe)
    set_seed(recipe.train.seed)
    built = build(recipe)
    model = built.model
    for name, p in model.named_parameters():  # B starts at zero; a trained adapter is non-zero (same memory)
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    picked = [int(k) for k in args.select.split(",")] if args.select else list(range(args.batches))
    batches = [collate([encoded.examples[i] for i in encoded.batches[k]], built.tokenizer.pad_token_id, True)
               for k in picked]
    rows = []
    for fused in (False, True):
        fused_lora.set_enabled(model, fused)
        for k, batch in enumerate(batches):
            positions = batch["input_ids"].numel()
            real = int(batch["attention_mask"].sum())
            started = time.perf_counter()
            saved = saved_by_layer(model, batch)
            per_layer = saved["per_layer_bytes"]
            rows.append({"fused_lora": fused, "batch": picked[k], "shape": list(batch["input_ids"].shape),
                         "real_tokens": real, "seconds": time.perf_counter() - started,
                         "saved_per_token_per_layer_kb": sum(per_layer) / len(per_layer) / positions / 1000,
                         "saved_total_mib": (sum(per_layer) + saved["outside_layers_bytes"]) / MIB,
                         "outside_layers_mib": saved["outside_layers_bytes"] / MIB})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    peaks = {}
    for fused in (False, True):
        fused_lora.set_enabled(model, fused)
        peaks[str(fused)] = max((live_peak(model, b, optimizer) for b in batches), key=lambda r: r["live_peak_mib"])
        model.zero_grad(set_to_none=True)
    args_text = f"--select {args.select}" if args.select else f"--batches {args.batches}"
    return {"method": args.method, "args": args_text, "fused_lora_install": built.fused_lora, "rows": rows, "live_peak": peaks,
            "threads": torch.get_num_threads()}


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [f"# Saved activations per token and decoder layer: SmolLM2-135M {result['method']}, SQuAD batches", "",
             "Counted with torch.autograd.graph.saved_tensors_hooks (each storage once, parameters left out); per "
             "token = per padded position of the batch; fp32.", "",
             "| batch (rows x tokens) | real tokens | unfused KB/token/layer | fused KB/token/layer | fewer | "
             "unfused total MiB | fused total MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k in sorted({r["batch"] for r in rows}):
        a = next(r for r in rows if r["batch"] == k and not r["fused_lora"])
        b = next(r for r in rows if r["batch"] == k and r["fused_lora"])
        fewer = 1 - b["saved_per_token_per_layer_kb"] / a["saved_per_token_per_layer_kb"]
        lines.append(f"| {a['shape'][0]} x {a['shape'][1]} | {a['real_tokens']} | "
                     f"{a['saved_per_token_per_layer_kb']:.1f} | {b['saved_per_token_per_layer_kb']:.1f} | "
                     f"{100 * fewer:.0f}% | {a['saved_total_mib']:.0f} | {b['saved_total_mib']:.0f} |")
    lines += ["", "Live-tensor peak of one training step (profiler allocation events + tensors alive before it), "
              "the largest over these batches:", "", "| fused_lora | live-tensor peak MiB | of which weights, "
              "adapter, gradients, optimizer state |", "| --- | ---: | ---: |"]
    for key, peak in result["live_peak"].items():
        lines.append(f"| {key.lower()} | {peak['live_peak_mib']:.0f} | {peak['resident_before_mib']:.0f} |")
    lines += ["", f"Command: `python benchmarks/saved_bytes.py --method {result['method']} {result['args']}` "
              f"({result['threads']} threads)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="lora", choices=["lora", "qlora"])
    parser.add_argument("--batches", type=int, default=3, help="first length-grouped batches to measure")
    parser.add_argument("--select", default="", help="comma-separated batch indices instead of the first --batches")
    parser.add_argument("--examples", type=int, default=400, help="SQuAD rows to draw the batches from")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "levers-cpu"))
    args = parser.parse_args()
    quiet_libraries()
    result = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "saved_bytes" if args.method == "lora" else f"saved_bytes_{args.method}"
    stem += f"_batches_{args.select.replace(',', '_')}" if args.select else ""
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
