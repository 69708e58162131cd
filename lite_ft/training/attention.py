"""Causal self-attention for training on the CPU (the fused LoRA layers' attention kernel).

torch's CPU flash-attention kernel computes every query against every key when given a padding mask, and runs its
small-block matmuls at 80-110 GFLOP/s here (SmolLM2, batch 8 x 348 tokens: 67-83 ms a layer forward + backward in
fp32, 62-68 in bf16; 23% of a bf16 LoRA step). This kernel splits the queries into chunks of about CHUNK rows; each chunk
meets only the keys some row of it may attend to (the causal triangle and trailing padding drop out), as batched
matmuls with the query heads that share a key head stacked into one matrix (grouped-query attention needs no copied
keys).

Backward needs the attention weights (softmax of the scores). In fp32 it recomputes them chunk by chunk from the
saved query, key and value, so it keeps no more than the flash kernel does (not even its output or log-sum-exp). In
bf16 and fp16 it keeps them when they take at most KEEP_BYTES a call (keeps_weights; train.attention_weights
chooses otherwise): the weights take half the bytes there, and recomputing them (the score matmul, the mask and the
softmax again) costs about a quarter of the kernel's time (benchmarks/attention.py: 35.1 against 26.6 ms a layer at
SQuAD batch 8 x 348 in bf16, about 4% of a step). Measured in the README's speed section.

The score matrices live in buffers reused from call to call (Workspace): allocators that return freed memory to
the system (jemalloc's defaults, glibc's mmap threshold) would otherwise fault in ~12 MB of fresh pages for every
chunk. Measured (benchmarks/results/levers-cpu/attention.md): 1.8-2.1x SDPA's speed in bf16, 0.98-1.29x in fp32.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

CHUNK = 128  # query rows per chunk: 3 chunks of 116 at 348 tokens do 2/3 of the square's work
SCORES_BYTES = 16 << 20  # score matrix bytes per pass: more batch rows per pass than this are split into passes
KEEP_BYTES = 16 << 20  # 16-bit attention weights kept for backward per call at most (SmolLM2, SQuAD batch 8 x 348
# in bf16: 11.6 MB a layer, 349 MB a step); beyond it they are recomputed, so their O(tokens^2) size stays bounded


class Workspace:
    """Grow-only flat buffers, one per purpose, dtype and device, handed out as views of the requested shape. Only
    one attention call runs at a time and none of its views outlives it. They stay allocated between steps, as part
    of the run's memory: lite-ft plan's replay on the meta device keeps them the same way (clear() first)."""

    def __init__(self) -> None:
        self.flat: dict[tuple[str, torch.dtype, str], torch.Tensor] = {}

    def take(self, purpose: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        key = (purpose, dtype, device.type)
        buf = self.flat.get(key)
        if buf is None or buf.numel() < numel:
            self.flat.pop(key, None)  # the old one is freed before the larger one is made
            buf = self.flat[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel].view(shape)

    def clear(self) -> None:
        self.flat.clear()


WORKSPACE = Workspace()
_META_TARGET = ["cpu"]  # the device a replay on the meta device stands for (lite-ft plan sets it)


@contextmanager
def replaying(device: str) -> Iterator[None]:
    """Meta-device tensors stand for `device` meanwhile: they take this kernel only when it is "cpu", as the run
    they replay would."""
    _META_TARGET.append(device)
    try:
        yield
    finally:
        _META_TARGET.pop()


def supports(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float) -> bool:
    """Whether causal_attention computes what the model's SDPA kernel would for these inputs: no dropout, one
    query per key, and no mask or transformers' boolean (batch, 1, queries, keys) mask on the CPU (or the meta
    device of a replay), with no query row that may attend to nothing (SDPA's answer for those differs)."""
    device = _META_TARGET[-1] if query.device.type == "meta" else query.device.type
    if dropout > 0 or device != "cpu" or query.shape[-2] != key.shape[-2]:
        return False
    if query.shape[1] % key.shape[1]:
        return False
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != key.shape[-2]:
        return False
    return mask.device.type == "meta" or bool(mask.any(dim=-1).all())


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, weights: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for query (batch, heads, tokens, dim) and key/value (batch, kv heads,
    tokens, dim); the output is (batch, tokens, heads, dim), as the o_proj wants it. `mask`: transformers' boolean
    (batch, 1, tokens, tokens) attention mask, or None for a causal one. `weights`: "keep", "recompute" or "auto"
    (keeps_weights)."""
    return CausalAttention.apply(query, key, value, mask, scale, weights)


def _chunks(mask: torch.Tensor | None, length: int, rows: int, heads: int, itemsize: int
            ) -> list[tuple[int, int, int, int]]:
    """(first query, end query, keys seen, batch rows per pass) of each query chunk. The keys a chunk sees end at
    the last one any of its rows may attend to (read from the mask; the causal bound without one)."""
    n = max(1, math.ceil(length / CHUNK))
    size = math.ceil(length / n)
    starts = range(0, length, size)
    if mask is not None and mask.device.type != "meta":  # the meta device cannot be read: assume causal
        seen = mask[:, 0].any(dim=0)  # (queries, keys): attended by some batch row
        ends = [int(seen[r:r + size].any(dim=0).nonzero().max()) + 1 for r in starts]
    else:
        ends = [min(r + size, length) for r in starts]
    out = []
    for r, end in zip(starts, ends):
        per_row = heads * min(size, length - r) * end * itemsize
        out.append((r, min(r + size, length), end, max(1, min(rows, SCORES_BYTES // max(per_row, 1)))))
    return out


def keeps_weights(policy: str, dtype: torch.dtype, parts: list[tuple[int, int, int, int]], batch: int,
                  heads: int) -> bool:
    """Whether the attention weights of these chunks are kept for backward rather than recomputed: as `policy`
    says ("keep", "recompute"), or under "auto" when they are 16-bit and take at most KEEP_BYTES (see the module
    docstring)."""
    if policy != "auto":
        return policy == "keep"
    return dtype in (torch.bfloat16, torch.float16) and _weights_numel(parts, batch, heads) * 2 <= KEEP_BYTES


def _weights_numel(parts: list[tuple[int, int, int, int]], batch: int, heads: int) -> int:
    return sum(batch * heads * (r1 - r0) * end for r0, r1, end, _ in parts)


def _weights_shape(part: tuple[int, int, int, int], b0: int, nb: int, heads: int, kv: int) -> tuple[int, ...]:
    """(batch rows of the pass, key heads, stacked query rows, keys seen) of batch rows b0.. of one chunk."""
    r0, r1, end, per = part
    return (min(b0 + per, nb) - b0, kv, heads // kv * (r1 - r0), end)


def _query(q: torch.Tensor, kv: int, part: tuple[int, int, int, int], b0: int, scale: float) -> torch.Tensor:
    """The scaled query chunk of batch rows b0.., stacked by key head (b, kv, group x rows, dim), in workspace."""
    r0, r1, _, per = part
    nb, heads, _, dim = q.shape
    b1 = min(b0 + per, nb)
    qc = WORKSPACE.take("query", (b1 - b0, heads, r1 - r0, dim), q.dtype, q.device)
    torch.mul(q[b0:b1, :, r0:r1], scale, out=qc)
    return qc.view(b1 - b0, kv, heads // kv * (r1 - r0), dim)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, part: tuple[int, int, int, int],
            b0: int, scale: float, into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled query chunk stacked by key head, softmax weights) of batch rows b0.. of one chunk; the weights in
    `into`, else in workspace."""
    r0, r1, end, per = part
    nb, heads = q.shape[:2]
    b1 = min(b0 + per, nb)
    kv = k.shape[1]
    rows, group = r1 - r0, heads // kv
    qc = _query(q, kv, part, b0, scale)
    s = into if into is not None else WORKSPACE.take("scores", _weights_shape(part, b0, nb, heads, kv), q.dtype,
                                                     q.device)
    torch.matmul(qc, k[b0:b1, :, :end].transpose(-1, -2), out=s)
    if mask is not None:
        blocked = mask[b0:b1, 0, r0:r1, :end].logical_not()
    else:
        blocked = torch.ones(rows, end, dtype=torch.bool, device=q.device).triu_(r0 + 1)
    s.view(b1 - b0, kv, group, rows, end).masked_fill_(blocked.unsqueeze(-3).unsqueeze(-3), float("-inf"))
    if q.device.type == "meta":
        return qc, torch.softmax(s, -1)
    return qc, torch.ops.aten._softmax.out(s, -1, False, out=s)  # in place: row by row, read before written


def _by_key_head(t: torch.Tensor, kv: int) -> torch.Tensor:
    """(batch, rows, heads, dim) -> (batch, kv heads, group x rows, dim): the layout of a stacked query chunk."""
    b, rows, heads, dim = t.shape
    return t.view(b, rows, kv, heads // kv, dim).permute(0, 2, 3, 1, 4)


class CausalAttention(torch.autograd.Function):
    """See the module docstring. Saves query, key, value, the mask and (keeps_weights) the attention weights of every
    chunk in one flat tensor; recomputes the weights in backward otherwise."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float, weights: str) -> torch.Tensor:
        nb, heads, length, dim = q.shape
        kv = k.shape[1]
        out = torch.empty(nb, length, heads, dim, dtype=q.dtype, device=q.device)
        parts = _chunks(mask, length, nb, heads, q.element_size())
        kept = None
        if keeps_weights(weights, q.dtype, parts, nb, heads):
            kept = torch.empty(_weights_numel(parts, nb, heads), dtype=q.dtype, device=q.device)
        for part, b0, into in _passes(parts, nb, heads, kv, kept):
            r0, r1, end, per = part
            b1 = min(b0 + per, nb)
            _, p = _scores(q, k, mask, part, b0, scale, into)
            o = WORKSPACE.take("output", (b1 - b0, kv, p.shape[2], dim), q.dtype, q.device)
            torch.matmul(p, v[b0:b1, :, :end], out=o)
            _by_key_head(out[b0:b1, r0:r1], kv).copy_(o.view(b1 - b0, kv, heads // kv, r1 - r0, dim))
        ctx.save_for_backward(q, k, v, mask, kept)
        ctx.scale, ctx.parts = scale, parts
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, mask, kept = ctx.saved_tensors
        nb, heads, length, dim = q.shape
        kv = k.shape[1]
        dq = torch.empty(nb, length, heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)  # q's layout
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for part, b0, weights in _passes(ctx.parts, nb, heads, kv, kept):
            r0, r1, end, per = part
            b1 = min(b0 + per, nb)
            if weights is None:
                qc, p = _scores(q, k, mask, part, b0, ctx.scale)
            else:
                qc, p = _query(q, kv, part, b0, ctx.scale), weights
            shape = (b1 - b0, kv, p.shape[2], dim)
            do = WORKSPACE.take("grad output", shape, q.dtype, q.device)
            do.view(b1 - b0, kv, heads // kv, r1 - r0, dim).copy_(_by_key_head(grad[b0:b1, r0:r1], kv))
            dv[b0:b1, :, :end] += p.transpose(-1, -2) @ do
            dp = WORKSPACE.take("grad scores", p.shape, q.dtype, q.device)
            torch.matmul(do, v[b0:b1, :, :end].transpose(-1, -2), out=dp)
            # dS = P * (dP - rowsum(dP * P)); the scale is already in qc, and goes on dq below
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype) if q.device.type == "meta" else \
                torch.ops.aten._softmax_backward_data.out(dp, p, -1, p.dtype, grad_input=dp)
            dk[b0:b1, :, :end] += ds.transpose(-1, -2) @ qc
            dq_c = WORKSPACE.take("grad query", shape, q.dtype, q.device)
            torch.matmul(ds, k[b0:b1, :, :end], out=dq_c)
            torch.mul(dq_c.view(b1 - b0, heads, r1 - r0, dim), ctx.scale, out=dq[b0:b1, :, r0:r1])
        return dq, dk, dv, None, None, None


def _passes(parts: list[tuple[int, int, int, int]], nb: int, heads: int, kv: int, kept: torch.Tensor | None
            ) -> Iterator[tuple[tuple[int, int, int, int], int, torch.Tensor | None]]:
    """(chunk, first batch row, its weights' view of the kept flat tensor or None) of every pass, in order."""
    at = 0
    for part in parts:
        for b0 in range(0, nb, part[3]):
            shape = _weights_shape(part, b0, nb, heads, kv)
            n = math.prod(shape)
            yield part, b0, None if kept is None else kept[at:at + n].view(shape)
            at += n
