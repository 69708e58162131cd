"""lite_ft.training.attention: the chunked causal attention of the fused LoRA layers computes what torch's SDPA
computes (outputs and the gradients of query, key and value, fp32, 1e-5), however the queries are chunked and the
batch split into passes; it takes only the inputs it computes exactly, and reuses its score buffers. In bf16 it keeps
the attention weights for backward instead of recomputing them, with the same bits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lite_ft.training import attention

TOL = 1e-5


def _inputs(rows: int, heads: int, kv_heads: int, length: int, pad: list[int], dtype: torch.dtype = torch.float32,
            left: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query laid out as the fused block makes it ((batch, tokens, heads, dim) seen as (batch, heads, tokens,
    dim)), key and value, and transformers' boolean mask: causal, `pad[i]` padded keys at the end of row i (at the
    start with `left`)."""
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(rows, length, heads, 16, generator=gen, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(rows, kv_heads, length, 16, generator=gen, dtype=dtype) for _ in range(2))
    keys = torch.ones(rows, length, dtype=torch.bool)
    for i, n in enumerate(pad):
        if n and left:
            keys[i, :n] = False
        elif n:
            keys[i, length - n:] = False
    mask = torch.ones(length, length, dtype=torch.bool).tril() & keys[:, None, :]
    return q, k, v, mask[:, None]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]  # the model's repeat_kv
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _run(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
         ) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, mask)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("chunk, scores_bytes", [(128, 16 << 20), (8, 16 << 20), (7, 4096)])
@pytest.mark.parametrize("masked", [True, False])
def test_matches_sdpa(chunk: int, scores_bytes: int, masked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """One chunk, several chunks of 8 rows, chunks of 7 rows in passes of a batch row or two: all equal SDPA's
    output and gradients, with padded rows (the keys a chunk sees end early) or with no mask (causal)."""
    monkeypatch.setattr(attention, "CHUNK", chunk)
    monkeypatch.setattr(attention, "SCORES_BYTES", scores_bytes)
    q, k, v, mask = _inputs(rows=3, heads=6, kv_heads=2, length=29, pad=[0, 5, 11] if masked else [0, 0, 0])
    mask = mask if masked else None
    assert attention.supports(q, k, mask, 0.0)
    got = _run(lambda *a: attention.causal_attention(*a, 16 ** -0.5), q, k, v, mask)
    want = _run(_sdpa, q, k, v, mask)
    for name, a, b in zip(("output", "query", "key", "value"), got, want):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, rtol=TOL, atol=TOL), (name, (a - b).abs().max())
    assert got[1].stride() == q.stride()  # the query's gradient keeps its layout


def test_bf16_stays_close_to_sdpa() -> None:
    """bf16 (scores and weights in bf16, as the matmuls take them): within bf16's rounding of SDPA's result."""
    q, k, v, mask = _inputs(rows=2, heads=4, kv_heads=4, length=40, pad=[0, 9], dtype=torch.bfloat16)
    got = _run(lambda *a: attention.causal_attention(*a, 16 ** -0.5), q, k, v, mask)
    want = _run(_sdpa, q.double(), k.double(), v.double(), mask)
    for a, b in zip(got, want):
        assert ((a.double() - b).norm() / b.norm()) < 2e-2


def test_takes_only_what_it_computes_exactly() -> None:
    q, k, v, mask = _inputs(rows=2, heads=4, kv_heads=2, length=12, pad=[0, 3])
    assert attention.supports(q, k, mask, 0.0) and attention.supports(q, k, None, 0.0)
    assert not attention.supports(q, k, mask, 0.1)  # dropout
    assert not attention.supports(q, k, mask.float(), 0.0)  # an additive (eager) mask
    assert not attention.supports(q[:, :, :5], k, None, 0.0)  # queries against a longer cache
    left = _inputs(rows=2, heads=4, kv_heads=2, length=12, pad=[0, 3], left=True)[3]
    assert not attention.supports(q, k, left, 0.0)  # left padding: rows that attend to nothing


def test_reuses_its_score_buffers() -> None:
    q, k, v, mask = _inputs(rows=2, heads=4, kv_heads=2, length=24, pad=[0, 4])
    _run(lambda *a: attention.causal_attention(*a, 0.25), q, k, v, mask)
    before = {key: t.data_ptr() for key, t in attention.WORKSPACE.flat.items()}
    _run(lambda *a: attention.causal_attention(*a, 0.25), q, k, v, mask)
    assert before and {key: t.data_ptr() for key, t in attention.WORKSPACE.flat.items()} == before


def _saved_numels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Sizes of the tensors causal_attention saves for backward."""
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        attention.causal_attention(*(t.detach().requires_grad_() for t in (q, k, v)), mask, 0.25)
    return saved


@pytest.mark.parametrize("scores_bytes", [16 << 20, 4096])
def test_bf16_keeps_the_weights_and_computes_what_recomputing_them_computes(scores_bytes: int,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """In bf16 within KEEP_BYTES the softmax weights of every chunk (and pass) are saved in one flat tensor instead
    of being recomputed in backward; output and gradients are the same bits as with recomputation (KEEP_BYTES 0)."""
    monkeypatch.setattr(attention, "CHUNK", 8)
    monkeypatch.setattr(attention, "SCORES_BYTES", scores_bytes)
    q, k, v, mask = _inputs(rows=3, heads=6, kv_heads=2, length=29, pad=[0, 5, 11], dtype=torch.bfloat16)
    parts = attention._chunks(mask, 29, 3, 6, 2)
    weights = sum(3 * 6 * (r1 - r0) * end for r0, r1, end, _ in parts)
    assert attention.keeps_weights("auto", torch.bfloat16, parts, 3, 6)
    assert sorted(_saved_numels(q, k, v, mask)) == sorted([q.numel(), k.numel(), v.numel(), mask.numel(), weights])
    kept = _run(lambda *a: attention.causal_attention(*a, 0.25), q, k, v, mask)
    monkeypatch.setattr(attention, "KEEP_BYTES", 0)
    assert len(_saved_numels(q, k, v, mask)) == 4
    recomputed = _run(lambda *a: attention.causal_attention(*a, 0.25), q, k, v, mask)
    for name, a, b in zip(("output", "query", "key", "value"), kept, recomputed):
        assert torch.equal(a, b), name


def test_fp32_recomputes_the_weights_unless_asked_to_keep_them() -> None:
    """fp32 keeps the least by default: query, key, value and the mask, whatever the size. Kept on request
    (train.attention_weights: keep), its output and gradients still equal SDPA's; "recompute" holds for bf16."""
    q, k, v, mask = _inputs(rows=2, heads=4, kv_heads=2, length=24, pad=[0, 4])
    assert sorted(_saved_numels(q, k, v, mask)) == sorted([q.numel(), k.numel(), v.numel(), mask.numel()])
    parts = attention._chunks(mask, 24, 2, 4, 4)
    assert attention.keeps_weights("keep", torch.float32, parts, 2, 4)
    assert not attention.keeps_weights("recompute", torch.bfloat16, parts, 2, 4)
    got = _run(lambda *a: attention.causal_attention(*a, 16 ** -0.5, "keep"), q, k, v, mask)
    for name, a, b in zip(("output", "query", "key", "value"), got, _run(_sdpa, q, k, v, mask)):
        assert torch.allclose(a, b, rtol=TOL, atol=TOL), (name, (a - b).abs().max())
