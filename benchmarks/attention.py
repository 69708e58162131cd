"""lite-ft's chunked causal attention (lite_ft/training/attention.py) against torch's SDPA, forward and backward, at
SmolLM2-135M's attention shapes (9 query heads, 3 key/value heads, head dim 64) on right-padded batches of 8, in
fp32 and bf16, with the attention weights recomputed in backward and kept from forward (train.attention_weights).
Run it alone (the timings share the cores), under the allocator a `lite-ft run` gets:

    LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=oversize_threshold:1073741824,muzzy_decay_ms:-1 \\
        python benchmarks/attention.py [--out benchmarks/results/levers-cpu]

Writes attention.json and attention.md into --out (under a minute on 2 cores). The whole-step effect is
benchmarks/levers.py's "sdpa attention" variants.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lite_ft.training.attention import causal_attention

HEADS, KV_HEADS, DIM, ROWS = 9, 3, 64, 8


def inputs(length: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Query as the fused block lays it out, key, value, and a causal mask over right-padded rows (up to 1/8 of
    each row padded, the first row full)."""
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(ROWS, length, HEADS, DIM, generator=gen).to(dtype).transpose(1, 2)
    k, v = (torch.randn(ROWS, KV_HEADS, length, DIM, generator=gen).to(dtype) for _ in range(2))
    lengths = torch.randint(length - length // 8, length + 1, (ROWS,), generator=gen)
    lengths[0] = length
    keys = torch.arange(length)[None, :] < lengths[:, None]
    mask = torch.ones(length, length, dtype=torch.bool).tril() & keys[:, None, :]
    return q, k, v, mask[:, None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the model's SDPA path computes: key/value heads repeated, the boolean mask, output (batch, tokens,
    heads, dim)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def time_kernel(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, repeats: int
                ) -> dict[str, float]:
    """Best-of-`repeats` forward and backward milliseconds (after one warm-up call)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(ROWS, q.shape[2], HEADS, DIM).to(q.dtype)
    forward, backward = [], []
    for i in range(repeats + 1):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        out = fn(*leaves, mask)
        middle = time.perf_counter()
        out.backward(grad)
        end = time.perf_counter()
        if i:
            forward.append(middle - start)
            backward.append(end - middle)
    return {"forward_ms": min(forward) * 1e3, "backward_ms": min(backward) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="176,348", help="padded batch widths (SQuAD batches: 160-384)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "levers-cpu"))
    args = parser.parse_args()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for length in (int(x) for x in args.lengths.split(",")):
            q, k, v, mask = inputs(length, dtype)
            row = {"dtype": str(dtype).replace("torch.", ""), "length": length}
            for policy in ("recompute", "keep"):
                row[f"lite_ft_{policy}"] = time_kernel(lambda *a: causal_attention(*a, DIM ** -0.5, policy), q, k,
                                                       v, mask, args.repeats)
            row["sdpa"] = time_kernel(sdpa, q, k, v, mask, args.repeats)
            rows.append(row)
    allocator = f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')} MALLOC_CONF={os.environ.get('MALLOC_CONF', '')}"
    lines = [f"# Attention kernels, SmolLM2-135M shapes ({ROWS} rows, {HEADS} heads, {KV_HEADS} key/value heads, "
             f"dim {DIM}), right-padded causal mask", "",
             "lite-ft recomputes its attention weights in backward (fp32's default) or keeps them from forward (bf16's "
             "default while they take at most 16 MiB; both columns are lite-ft's kernel).", "",
             "| dtype | tokens | SDPA fwd + bwd ms | recompute fwd ms | recompute bwd ms | keep fwd ms | keep bwd ms | "
             "recompute speed / SDPA's | keep speed / recompute's |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        total = {name: r[name]["forward_ms"] + r[name]["backward_ms"]
                 for name in ("sdpa", "lite_ft_recompute", "lite_ft_keep")}
        a, b = r["lite_ft_recompute"], r["lite_ft_keep"]
        lines.append(f"| {r['dtype']} | {r['length']} | {total['sdpa']:.1f} | {a['forward_ms']:.1f} | "
                     f"{a['backward_ms']:.1f} | {b['forward_ms']:.1f} | {b['backward_ms']:.1f} | "
                     f"{total['sdpa'] / total['lite_ft_recompute']:.2f}x | "
                     f"{total['lite_ft_recompute'] / total['lite_ft_keep']:.2f}x |")
    lines += ["", f"Command: `python benchmarks/attention.py --lengths {args.lengths} --repeats {args.repeats}` "
              f"(best of {args.repeats}, {torch.get_num_threads()} threads, torch {torch.__version__}; {allocator})",
              ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (out / "attention.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
