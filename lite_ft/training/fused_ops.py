"""Hand-written forward and backward passes for a Llama decoder layer's LoRA projections (train.fused_lora).

Two autograd Functions, each starting from the layer's residual stream (its RMSNorm folded in):
- attention input: RMSNorm -> q/k/v (frozen base + LoRA, one matmul for the three LoRA-A over their shared input)
  -> rotary embedding. Keeps the residual input, its 1/rms and the rank-r LoRA-A outputs; the normalised input,
  the projections and the rotary intermediates are recomputed or not needed in backward.
- MLP: RMSNorm -> gate/up (one LoRA-A matmul) -> SiLU(gate) * up -> down. Keeps the residual input, 1/rms, gate
  and up and the LoRA-A outputs; SiLU, the gate product and the normalised input are recomputed in backward.

The LoRA-A/B weights are peft's own parameters, passed in as inputs so autograd fills their .grad as usual. Frozen
base weights are read from the module in forward and again in backward: 4-bit NF4 and LLM.int8 weights are
dequantized on the fly into buffers reused across calls on the CPU (WeightScratch), never kept. A third Function
(Linear) takes the attention's o_proj the same way. Saved bytes: benchmarks/results/levers-cpu/saved_bytes.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def dense_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight (out, in) in `dtype`: a plain Linear's own, a 4-bit NF4 one dequantized, an
    LLM.int8 one as int8 rows times their scales (what bitsandbytes' CPU training path computes)."""
    kind = type(base).__name__
    if kind == "Linear4bit":
        import bitsandbytes.functional as bnbf

        check_standard_layout(base)
        state = base.weight.quant_state
        if base.weight.device.type == "cpu" and WeightScratch.fits(state):
            return SCRATCH.dequantize_4bit(base.weight.data, state).to(dtype)
        return bnbf.dequantize_4bit(base.weight.data, state).to(dtype)
    if kind == "Linear8bitLt":
        state = base.state
        cb = state.CB if state.CB is not None else base.weight.data
        scb = state.SCB if state.SCB is not None else base.weight.SCB
        scale = (scb.to(dtype) / 127.0).unsqueeze(1)
        if cb.device.type == "cpu":
            return SCRATCH.buffer("int8 rows", cb.shape, dtype).copy_(cb).mul_(scale)
        return cb.to(dtype) * scale
    return base.weight if base.weight.dtype == dtype else base.weight.to(dtype)


CODES_PER_PASS = 1 << 20  # packed bytes per pass of WeightScratch.dequantize_4bit: a 4 MiB int32 index buffer


class WeightScratch:
    """Buffers for dequantized frozen weights on the CPU, one per (purpose, shape, dtype), reused by every call.

    A fused block uses each dequantized weight in one matmul and drops it before the next is made, so one buffer
    per shape is enough. Fresh ones (0.4-3.5 MiB for SmolLM2) leave holes in glibc's heap that the small tensors
    kept for backward split: SmolLM2 QLoRA, SQuAD batch 8, 4 steps peaked at 4,119 / 4,206 MiB with these buffers
    against 4,421 / 4,506 with fresh weights (same losses and step times). bitsandbytes' CPU dequantize has no out=
    kernel, so the 4-bit one is written here with torch ops (bit-identical to bitsandbytes' flat read of the codes;
    tested). CUDA's caching allocator already reuses blocks: not used there."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, tuple[int, ...], torch.dtype], torch.Tensor] = {}

    def buffer(self, purpose: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        key = (purpose, tuple(shape), dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(key[1], dtype=dtype)
        return self.buffers[key]

    @staticmethod
    def fits(state: Any) -> bool:
        """Whether dequantize_4bit can handle this weight: whole blocks of an even number of values."""
        numel = math.prod(state.shape)
        return numel % 2 == 0 and numel % state.blocksize == 0

    def dequantize_4bit(self, packed: torch.Tensor, state: Any) -> torch.Tensor:
        """bitsandbytes' 4-bit weight (two values a byte, the first in the high nibble, one absmax per block) in
        state.dtype, in this object's buffer for its shape."""
        import bitsandbytes.functional as bnbf

        codes = packed.view(torch.uint8).reshape(-1)
        values = self.buffer("4-bit values", state.shape, torch.float32)  # code x absmax in fp32, as bnb does
        # each byte holds two codes: look both up at once in a 256-entry table of fp32 pairs read as int64 (a 1-D
        # gather: 0.4 ms for a 1536 x 576 weight here, where one of (256, 2) rows took 1.3 and bitsandbytes 0.6)
        table = state.code.float()
        byte = torch.arange(256)
        pairs = torch.stack([table[byte >> 4], table[byte & 15]], dim=1).contiguous().view(torch.int64).view(-1)
        flat = values.view(-1).view(torch.int64)
        index = self.buffer("4-bit codes", (min(codes.numel(), CODES_PER_PASS),), torch.int32)
        for start in range(0, codes.numel(), CODES_PER_PASS):  # in passes: the index buffer stays small
            part = codes[start:start + CODES_PER_PASS]
            idx = index[:part.numel()].copy_(part)
            torch.index_select(pairs, 0, idx, out=flat[start:start + part.numel()])
        absmax = state.absmax
        if state.nested:  # double quantization: the absmax values are themselves 8-bit blockwise
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        values.view(-1, state.blocksize).mul_(absmax.view(-1, 1).float())
        if state.dtype == torch.float32:
            return values
        return self.buffer("4-bit", state.shape, state.dtype).copy_(values)


SCRATCH = WeightScratch()


def check_standard_layout(base: torch.nn.Module) -> None:
    """Fail loudly on a 4-bit weight bitsandbytes has repacked for its CPU kernel (see keep_standard_layout):
    dequantize_4bit would read that layout as garbage (loss 22 instead of 2 on SmolLM2), not raise."""
    if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        raise RuntimeError("bitsandbytes repacked a 4-bit weight for its CPU kernel before the fused LoRA blocks "
                           "read it; set train.fused_lora: false")


def keep_standard_layout(base: torch.nn.Module) -> None:
    """Keep a Linear4bit's weight in bitsandbytes' standard layout. On CPUs with AVX512-BF16, bitsandbytes 0.49+
    repacks it in place on the first forward without gradients (lite-ft's loss check runs one before training;
    evaluations do too); its kernel for that layout has no autograd formula (torch warns "an autograd kernel was
    not registered" when training goes on through it), and its way back re-quantizes the scales (up to 0.2% off
    per weight). Asking it not to pack costs its packed inference kernel, not correctness."""
    if hasattr(base, "support_avx512bf16_for_cpu"):
        base.support_avx512bf16_for_cpu = False
    check_standard_layout(base)


@dataclass(frozen=True)
class Projection:
    """One peft LoRA linear as the fused blocks see it: the frozen base module, its LoRA weights and scale."""

    base: torch.nn.Module
    lora_a: torch.nn.Parameter  # (r, in)
    lora_b: torch.nn.Parameter  # (out, r)
    scale: float

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        b = getattr(self.base, "bias", None)
        return None if b is None else b.to(dtype)


def _rms(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * 1/rms in fp32, 1/rms), as LlamaRMSNorm computes them."""
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * inv, inv


def _rms_backward(grad_y: torch.Tensor, x: torch.Tensor, inv: torch.Tensor, weight: torch.Tensor,
                  want_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of y = weight * (x / rms(x)) for x and (if asked) the norm weight."""
    n = x.float() * inv
    grad_w = (grad_y.float() * n).sum(dim=tuple(range(n.dim() - 1))).to(weight.dtype) if want_weight else None
    gn = (grad_y * weight).float()
    grad_x = inv * (gn - n * (gn * n).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_w


def product_dtype(compute: torch.dtype, adapters: torch.dtype) -> torch.dtype:
    """The dtype the LoRA products compute in: bf16 over a bf16 base, as autocast computes them (the fp32 adapters
    stay the master weights and take fp32 gradients); else the adapters' own (fp16's range is too narrow for
    their gradients, and fp32 over fp32 is what peft computes)."""
    return torch.bfloat16 if compute == torch.bfloat16 else adapters


def _lora_a_out(y: torch.Tensor, projs: tuple[Projection, ...]) -> torch.Tensor:
    """y times the LoRA-A of every projection, stacked: one matmul for the projections that share the input y.
    In product_dtype: a bf16 step no longer copies y, the products and their gradients to fp32 and back (they were
    a fifth of a bf16 LoRA step here, in rank-16 matmuls bound by those copies)."""
    a = projs[0].lora_a if len(projs) == 1 else torch.cat([p.lora_a for p in projs], dim=0)
    dtype = product_dtype(y.dtype, a.dtype)
    return y.to(dtype) @ a.to(dtype).t()


def _project(y: torch.Tensor, projs: tuple[Projection, ...], a_out: torch.Tensor) -> list[torch.Tensor]:
    """Base + scaled LoRA output of each projection of the shared input y; a_out is y times the stacked LoRA-A."""
    outs, start = [], 0
    for p in projs:
        r = p.lora_a.shape[0]
        out = F.linear(y, dense_weight(p.base, y.dtype), p.bias(y.dtype))
        a = a_out[..., start:start + r]
        if a.dtype == out.dtype:  # the LoRA product accumulates into the base output: no tokens x out of its own
            out.view(-1, out.shape[-1]).addmm_(a.reshape(-1, r), p.lora_b.to(a.dtype).t(), alpha=p.scale)
        else:  # an fp16 base with fp32 adapters: the LoRA product in fp32, added in the base's dtype
            out.add_((a @ p.lora_b.t()).mul_(p.scale).to(out.dtype))
        outs.append(out)
        start += r
    return outs


def _project_backward(y: torch.Tensor, projs: tuple[Projection, ...], a_out: torch.Tensor,
                      grads: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Gradient for y, and for each projection's LoRA-A and LoRA-B, given the gradient of each output."""
    flat_y = y.reshape(-1, y.shape[-1]).to(a_out.dtype)
    flat_a = a_out.reshape(-1, a_out.shape[-1])
    grad_y = None  # the first projection's product starts the sum (no zero-filled tokens x in tensor first)
    grad_a_out, grad_bs, start = [], [], 0
    for p, g in zip(projs, grads):
        r = p.lora_a.shape[0]
        g2 = g.reshape(-1, g.shape[-1])
        weight = dense_weight(p.base, g.dtype)
        if grad_y is None:
            grad_y = (g2 @ weight).view_as(y).to(y.dtype)
        else:  # the next products accumulate into it (g and y share a dtype): no tokens x in tensor of their own
            grad_y.view(-1, grad_y.shape[-1]).addmm_(g2, weight)
        g2 = g2.to(a_out.dtype)  # the scale goes on the rank-r products, not on a tokens x out copy of g
        grad_bs.append((g2.t() @ flat_a[:, start:start + r]).mul_(p.scale).to(p.lora_b.dtype))
        grad_a_out.append((g2 @ p.lora_b.to(a_out.dtype)).mul_(p.scale))
        start += r
    da = torch.cat(grad_a_out, dim=1)  # (tokens, sum of ranks): one matmul for every LoRA-A gradient
    a_all = torch.cat([p.lora_a for p in projs], dim=0)
    grad_a_all = (da.t() @ flat_y).to(a_all.dtype)
    a_all = a_all.to(da.dtype)
    if da.dtype == grad_y.dtype:
        grad_y.view(-1, grad_y.shape[-1]).addmm_(da, a_all)
    else:
        grad_y.add_((da @ a_all).view_as(y).to(y.dtype))
    grad_as = list(torch.split(grad_a_all, [p.lora_a.shape[0] for p in projs], dim=0))
    return grad_y, grad_as, grad_bs


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float  # the input RMSNorm's epsilon


class AttentionInput(torch.autograd.Function):
    """RMSNorm + q/k/v LoRA projections + rotary embedding: (query, key, value) as (batch, heads, tokens, dim)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, norm_w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                projs: tuple[Projection, ...], shape: AttentionShape, *lora: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, inv = _rms(x, shape.eps)
        y = norm_w * n.to(x.dtype)
        a_out = _lora_a_out(y, projs)
        q, k, v = _project(y, projs, a_out)
        b, t = x.shape[:2]
        q = q.view(b, t, shape.heads, shape.head_dim).transpose(1, 2)
        k = k.view(b, t, shape.kv_heads, shape.head_dim).transpose(1, 2)
        v = v.view(b, t, shape.kv_heads, shape.head_dim).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        ctx.save_for_backward(x, inv, a_out, cos, sin, norm_w)
        ctx.projs = projs
        return q, k, v

    @staticmethod
    def backward(ctx: Any, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor) -> tuple[Any, ...]:
        x, inv, a_out, cos, sin, norm_w = ctx.saved_tensors
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        b, t = x.shape[:2]
        gq = gq * c - _rotate_half(gq * s)  # the rotation is orthogonal: its transpose undoes it
        gk = gk * c - _rotate_half(gk * s)
        grads = [g.transpose(1, 2).reshape(b, t, -1) for g in (gq, gk, gv)]
        y = norm_w * (x.float() * inv).to(x.dtype)
        grad_y, grad_as, grad_bs = _project_backward(y, ctx.projs, a_out, grads)
        grad_x, grad_w = _rms_backward(grad_y, x, inv, norm_w, ctx.needs_input_grad[1])
        lora_grads = [g for pair in zip(grad_as, grad_bs) for g in pair]
        return (grad_x, grad_w, None, None, None, None, *lora_grads)


class Mlp(torch.autograd.Function):
    """RMSNorm + LoRA gate/up + SiLU(gate) * up + LoRA down: the MLP's output, before the residual add."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, norm_w: torch.Tensor, eps: float, projs: tuple[Projection, ...],
                *lora: torch.Tensor) -> torch.Tensor:
        n, inv = _rms(x, eps)
        y = norm_w * n.to(x.dtype)
        gate_up, down = projs[:2], projs[2]
        a_out = _lora_a_out(y, gate_up)
        gate, up = _project(y, gate_up, a_out)
        h = F.silu(gate).mul_(up)
        a_down = _lora_a_out(h, (down,))
        (out,) = _project(h, (down,), a_down)
        ctx.save_for_backward(x, inv, a_out, gate, up, a_down, norm_w)
        ctx.projs, ctx.eps = projs, eps
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, inv, a_out, gate, up, a_down, norm_w = ctx.saved_tensors
        gate_up, down = ctx.projs[:2], ctx.projs[2]
        sig = torch.sigmoid(gate)
        act = gate * sig
        h = act * up  # recomputed: cheaper than keeping 2 more (tokens x intermediate) tensors per layer
        grad_h, (grad_ad,), (grad_bd,) = _project_backward(h, (down,), a_down, [grad_out])
        # in place, same order, same bits: a fresh tokens x intermediate tensor is a new mapping to fault in (~5 ms)
        grad_up = torch.mul(grad_h, act, out=h)
        one_minus = torch.neg(sig, out=act).add_(1)
        grad_gate = grad_h.mul_(up).mul_(sig).mul_(one_minus.mul_(gate).add_(1))  # * (1 + gate * (1 - sig))
        y = norm_w * (x.float() * inv).to(x.dtype)
        grad_y, grad_as, grad_bs = _project_backward(y, gate_up, a_out, [grad_gate, grad_up])
        grad_x, grad_w = _rms_backward(grad_y, x, inv, norm_w, ctx.needs_input_grad[1])
        lora_grads = [g for pair in zip([*grad_as, grad_ad], [*grad_bs, grad_bd]) for g in pair]
        return (grad_x, grad_w, None, None, *lora_grads)


class Linear(torch.autograd.Function):
    """One LoRA projection on its own (the attention's o_proj): base + scaled LoRA, keeping the input and the rank-r
    LoRA-A output as peft's path does, with the frozen weight made by dense_weight (a reused buffer for 4-bit and
    8-bit weights on the CPU, where bitsandbytes' own path allocates a fresh one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, proj: Projection, *lora: torch.Tensor) -> torch.Tensor:
        a_out = _lora_a_out(x, (proj,))
        (out,) = _project(x, (proj,), a_out)
        ctx.save_for_backward(x, a_out)
        ctx.proj = proj
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        x, a_out = ctx.saved_tensors
        grad_x, (grad_a,), (grad_b,) = _project_backward(x, (ctx.proj,), a_out, [grad_out])
        return (grad_x, None, grad_a, grad_b)
