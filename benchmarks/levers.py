"""Which speed and memory levers pay on this machine: lite-ft LoRA on SQuAD, the same steps and batches, with one
setting changed at a time against the defaults. Each variant is its own `lite-ft run` process, run one after the
other (never two at once: they would share the cores).

    python benchmarks/levers.py [--steps 6] [--out benchmarks/results/levers-cpu]

Needs ../shared/data (or LITE_FT_SHARED_DATA). Takes about 12 minutes on a 2-core CPU with the defaults.
Writes levers.json and levers.md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from report import rates

REPO = Path(__file__).resolve().parent.parent

# name -> (what changes, recipe overrides, environment variables)
VARIANTS: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "defaults": ("lite-ft's defaults: fused LoRA blocks with lite-ft's chunked causal attention, length-grouped "
                 "batches, loss on labelled positions only, one thread per core, jemalloc (lite_ft.allocator's "
                 "JEMALLOC_CONF) where the system has it, else glibc mmap threshold 4 MiB on transparent huge pages",
                 [], {}),
    "sdpa attention": ("model.attention=sdpa: torch's SDPA (its CPU flash kernel) in the fused LoRA layers instead "
                       "of lite-ft's chunked causal attention", ["model.attention=sdpa"], {}),
    "bf16 sdpa attention": ("model.dtype=bfloat16 and model.attention=sdpa (compare with bf16)",
                            ["model.dtype=bfloat16", "model.attention=sdpa"], {}),
    "jemalloc own settings": ("jemalloc with its own settings (MALLOC_CONF empty: blocks over 8 MiB from an arena that "
                              "returns them at once, purged pages unmapped)", [], {"MALLOC_CONF": ""}),
    "bf16 jemalloc own settings": ("model.dtype=bfloat16 under jemalloc's own settings (compare with bf16)",
                                   ["model.dtype=bfloat16"], {"MALLOC_CONF": ""}),
    "glibc tuned": ("lite-ft's glibc setup instead of jemalloc (LITE_FT_ALLOCATOR=glibc-tuned): mmap threshold "
                    "4 MiB, transparent huge pages", [], {"LITE_FT_ALLOCATOR": "glibc-tuned"}),
    "tcmalloc": ("gperftools' tcmalloc preloaded (LD_PRELOAD=libtcmalloc_minimal.so.4) instead of jemalloc", [],
                 {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}),  # a soname: the loader finds it
    "jemalloc decay off": ("jemalloc keeping every freed page for reuse (MALLOC_CONF=dirty_decay_ms:-1,"
                           "muzzy_decay_ms:-1) instead of lite-ft's settings", [],
                           {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
    "glibc defaults": ("glibc's allocator as it comes (LITE_FT_ALLOCATOR=glibc): its mmap threshold moves up to "
                       "32 MiB, 4 KiB pages", [], {"LITE_FT_ALLOCATOR": "glibc"}),
    "no huge pages": ("glibc, mmap threshold 4 MiB, 4 KiB pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=0)", [],
                      {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "LITE_FT_ALLOCATOR": "glibc-tuned"}),
    "fused_lora off": ("train.fused_lora: false: peft's own LoRA forward, autograd's saved tensors",
                       ["train.fused_lora=false"], {}),
    "no length grouping": ("random batches padded to their longest example", ["train.group_by_length=false"], {}),
    "eager attention": ("attention as plain matmul + softmax instead of fused SDPA", ["model.attention=eager"], {}),
    "release memory": ("train.release_memory: freed memory goes back to the OS at once (jemalloc: decay 0; glibc: "
                       "mmap threshold 1 MiB)",
                       ["train.release_memory=true"], {}),
    **{f"mmap threshold {mib} MiB": (f"glibc mmap threshold {mib} MiB instead of 4 (GLIBC_TUNABLES), huge pages",
                                     [], {"GLIBC_TUNABLES": f"glibc.malloc.mmap_threshold={mib << 20}",
                                          "LITE_FT_ALLOCATOR": "glibc-tuned"})
       for mib in (2, 8, 16)},
    "arena max 1": ("one glibc malloc arena for all threads (MALLOC_ARENA_MAX=1)", [],
                    {"MALLOC_ARENA_MAX": "1", "LITE_FT_ALLOCATOR": "glibc-tuned"}),
    "thread affinity": ("OpenMP threads pinned one per core (OMP_PROC_BIND=close, OMP_PLACES=cores)", [],
                        {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}),
    "gradient checkpointing": ("activations recomputed in the backward pass", ["train.gradient_checkpointing=true"],
                               {}),
    "bf16": ("model.dtype=bfloat16: frozen base stored and computed in bf16, adapters fp32 (AMX / AVX512-BF16 "
             "CPUs only; ~400x slower without)", ["model.dtype=bfloat16"], {}),
    "bf16 attention weights recomputed": ("model.dtype=bfloat16, train.attention_weights=recompute: lite-ft's "
                                          "attention recomputes its softmax weights in backward, as in fp32, "
                                          "instead of keeping them (compare with bf16)",
                                          ["model.dtype=bfloat16", "train.attention_weights=recompute"], {}),
    "attention weights kept": ("train.attention_weights=keep: fp32 attention keeps its softmax weights for "
                               "backward instead of recomputing them", ["train.attention_weights=keep"], {}),
    "fp32": ("model.dtype=float32: everything in fp32", ["model.dtype=float32"], {}),
    "qlora fp32": ("method=qlora, model.dtype=float32: NF4 base dequantized to fp32", ["method=qlora",
                   "model.dtype=float32"], {}),
    "qlora bf16": ("method=qlora, model.dtype=bfloat16: NF4 base dequantized to bf16", ["method=qlora",
                   "model.dtype=bfloat16"], {}),
    "full fp32": ("method=full, model.dtype=float32", ["method=full", "model.dtype=float32"], {}),
    "full bf16": ("method=full, model.dtype=bfloat16: fp32 master weights, bf16 autocast",
                  ["method=full", "model.dtype=bfloat16"], {}),
}


def run_variant(name: str, overrides: list[str], env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """One `lite-ft run` with the variant's settings; its speed and memory figures from the run folder."""
    data = Path(os.environ.get("LITE_FT_SHARED_DATA", REPO.parent / "shared" / "data"))
    out = Path(args.out) / "runs" / name.replace(" ", "-")
    cmd = [sys.executable, "-m", "lite_ft", "run", str(REPO / "recipes" / "squad-lora.yaml"),
           f"data.train={data / 'squad_train.jsonl'}", "data.eval=null", f"data.limit_train={args.examples}",
           f"train.max_steps={args.steps}", "train.log_every=1", "train.save_every=0", "output.save_model=false",
           "eval.baseline=false", f"output.dir={out}", *overrides, "--overwrite"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    if proc.returncode != 0:
        return {"variant": name, "status": "failed", "error": (proc.stderr or proc.stdout).strip()[-500:]}
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    t = metrics["train"]
    elapsed = [e["elapsed_s"] for e in log]
    seconds = [b - a for a, b in zip([0.0, *elapsed], elapsed)]
    # step 1 pays one-time costs (allocations, thread pools): the steady figures leave it out
    steady = rates(seconds, [e["tokens_per_second"] * s for e, s in zip(log, seconds)])
    return {"variant": name, "status": "ok", "steady_tokens_per_second": steady["tok_s_steady"],
            "seconds_per_step_steady": steady["s_per_step_steady"],
            "tokens_per_second": t["tokens_per_second"], "peak_memory_mib": t["peak_memory_mib"],
            "peak_phase": t["peak_memory_phase"], "losses": [e["loss"] for e in log],
            "breakdown_mib": (t.get("memory_breakdown") or {}).get("parts_mib"), "allocator": t.get("allocator"),
            "wall_seconds": time.perf_counter() - started}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's repeats: the median speed (and the range), the highest peak, the last run's details."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return runs[-1]
    speeds = sorted(r["steady_tokens_per_second"] for r in ok)
    return {**ok[-1], "repeats": len(ok), "steady_tokens_per_second": speeds[len(speeds) // 2],
            "steady_tokens_per_second_all": speeds, "peak_memory_mib": max(r["peak_memory_mib"] for r in ok),
            "peak_memory_mib_all": [r["peak_memory_mib"] for r in ok]}


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The levers table: each variant against the defaults."""
    base = next(r for r in rows if r["variant"] == "defaults")
    lines = [f"# Levers: lite-ft LoRA on SQuAD, {args.steps} steps of 8, one setting changed at a time", "",
             ("| variant | what changes | real tok/s (steps 2+; median of runs, range) | vs defaults | s/step | "
              "peak RSS MiB (highest of runs) | vs defaults | loss at the last step |"),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        what = VARIANTS[r["variant"]][0]
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {what} | failed: {r['error'][:120]} | | | | | |")
            continue
        spread = r.get("steady_tokens_per_second_all", [])
        runs = f" ({len(spread)} runs: {spread[0]:.1f}-{spread[-1]:.1f})" if len(spread) > 1 else ""
        lines.append(f"| {r['variant']} | {what} | {r['steady_tokens_per_second']:.1f}{runs} | "
                     f"{r['steady_tokens_per_second'] / base['steady_tokens_per_second']:.2f}x | "
                     f"{r['seconds_per_step_steady']:.2f} | {r['peak_memory_mib']:.0f} | "
                     f"{r['peak_memory_mib'] / base['peak_memory_mib']:.2f}x | {r['losses'][-1]:.4f} |")
    lines += ["", f"Command: `python benchmarks/levers.py --steps {args.steps} --examples {args.examples} "
              f"--variants {args.variants} --repeats {args.repeats}"
              f"{' --interleave' if args.interleave else ''}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--examples", type=int, default=400, help="SQuAD training rows to draw the batches from")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (speed: median; memory: highest)")
    parser.add_argument("--interleave", action="store_true", help="run the repeats round by round (A B C, A B C) "
                        "instead of variant by variant (A A, B B, C C)")
    parser.add_argument("--merge", action="store_true", help="keep the variants already in --out/levers.json "
                        "that this call does not run (to split a long measurement into several calls)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "levers-cpu"))
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    out = Path(args.out)
    kept = {}
    if args.merge and (out / "levers.json").exists():
        kept = {r["variant"]: r for r in json.loads((out / "levers.json").read_text(encoding="utf-8"))}
    if "defaults" not in names and "defaults" not in kept:  # every table row is read against the defaults
        names.insert(0, "defaults")
    # --interleave: round r runs every variant once, so a machine whose speed drifts over the call (this VM's
    # does, by 15% or more) moves every variant's runs alike instead of favouring the ones measured first
    order = names * args.repeats if args.interleave else [name for name in names for _ in range(args.repeats)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    done = {}
    for i, name in enumerate(order, 1):
        print(f"[{i}/{len(order)}] {name} ...", file=sys.stderr, flush=True)
        _, overrides, env = VARIANTS[name]
        runs[name].append(run_variant(name, overrides, env, args))
        done[name] = aggregate(runs[name])
        r = runs[name][-1]
        print(f"    {r['status']}" + (f": {r['steady_tokens_per_second']:.1f} tok/s, peak {r['peak_memory_mib']:.0f} "
                                    f"MiB" if r["status"] == "ok" else f": {r['error'][-200:]}"), file=sys.stderr)
        merged = {**kept, **done}  # written after every run: a cut-short call keeps what it measured
        rows = [merged[n] for n in VARIANTS if n in merged]
        out.mkdir(parents=True, exist_ok=True)
        (out / "levers.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
        (out / "levers.md").write_text(markdown(rows, args), encoding="utf-8")
    print((out / "levers.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
