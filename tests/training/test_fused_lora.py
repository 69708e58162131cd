"""train.fused_lora: the fused decoder-layer blocks compute what peft's path computes (outputs and every adapter
gradient, fp32, 1e-5) for LoRA, QLoRA and LoRA-8bit; they keep fewer saved tensors; adapters, merges and saved
files are peft's; models or settings they cannot handle keep peft's path with a note."""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model_state_dict

from lite_ft.model import build
from lite_ft.plan.tracker import LiveBytes
from lite_ft.recipe.load import load_recipe
from lite_ft.training import fused_lora, fused_ops
from lite_ft.training.loop import set_seed

TOL = 1e-5


def _built(make_doc: Callable[..., dict[str, Any]], method: str = "lora", **sections: Any) -> Any:
    set_seed(0)
    built = build(load_recipe(document=make_doc("qa", method, **sections)))
    for name, p in built.model.named_parameters():  # B starts at zero: make it non-zero so A gets gradients too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return built


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row: the attention mask reaches the kernel through the fused path
    mask[2, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)  # as lite-ft's loop calls it
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), out.logits.detach(), grads


def _assert_same(model: torch.nn.Module, vocab: int, projections: int = 7) -> None:
    batch = _batch(vocab)
    assert fused_lora.set_enabled(model, False) > 0
    ref_loss, ref_logits, ref_grads = _loss_and_grads(model, batch)
    fused_lora.set_enabled(model, True)
    loss, logits, grads = _loss_and_grads(model, batch)
    assert torch.allclose(loss, ref_loss, rtol=TOL, atol=TOL)
    assert torch.allclose(logits, ref_logits, rtol=TOL, atol=TOL)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * projections * 2  # 2 layers x projections x (A, B)
    for name in grads:
        assert ref_grads[name].abs().max() > 0, name  # every adapter weight is really exercised
        assert torch.allclose(grads[name], ref_grads[name], rtol=TOL, atol=TOL), name


@pytest.mark.parametrize("method, quantization", [("lora", None), ("qlora", "4bit"), ("lora", "8bit")])
def test_fused_blocks_match_peft(make_doc: Callable[..., dict[str, Any]], method: str, quantization: str | None,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    built = _built(make_doc, method, model={"quantization": quantization},
                   lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
    assert built.fused_lora == "on: 2 of 2 decoder layers"
    if quantization:  # the quantized base really is quantized: the blocks dequantize it themselves
        kinds = {type(m).__name__ for m in built.model.modules()}
        assert ("Linear4bit" if quantization == "4bit" else "Linear8bitLt") in kinds
    calls = []  # the fused layers' own attention kernel (lite_ft.training.attention) is part of what is compared
    kernel = fused_lora.attention.causal_attention
    monkeypatch.setattr(fused_lora.attention, "causal_attention", lambda *a: calls.append(1) or kernel(*a))
    _assert_same(built.model, len(built.tokenizer))
    assert len(calls) == 2


def test_fused_blocks_with_o_proj_left_out(make_doc: Callable[..., dict[str, Any]]) -> None:
    """o_proj not among the targets: it runs as the model's own Linear inside the fused layer, same result."""
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    built = _built(make_doc, "qlora", model={"quantization": "4bit"},
                   lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets})
    assert built.fused_lora == "on: 2 of 2 decoder layers"
    _assert_same(built.model, len(built.tokenizer), projections=6)


@pytest.mark.parametrize("quant_type, nested, dtype", [("nf4", True, torch.float32), ("nf4", False, torch.bfloat16),
                                                       ("fp4", True, torch.float16)])
def test_scratch_dequantize_is_bitsandbytes_and_reuses_its_buffer(quant_type: str, nested: bool, dtype: torch.dtype,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes.functional as bnbf

    monkeypatch.setattr(fused_ops, "CODES_PER_PASS", 320)  # 1,536 packed bytes a weight: 5 passes, the last short
    scratch = fused_ops.WeightScratch()
    gen = torch.Generator().manual_seed(0)
    made = []
    for shape in ((48, 64), (64, 48), (48, 64)):
        w = torch.randn(shape, generator=gen).to(dtype)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
        assert fused_ops.WeightScratch.fits(state)
        got = scratch.dequantize_4bit(packed, state)
        # bitsandbytes quantizes the values flat, in blocks that may straddle rows; its CPU kernel (0.49.2 and
        # 0.50.2, on an AVX512 CPU) reads a (64, 48) weight block by row and gets it wrong (mean error 0.16
        # against 0.07), so the reference is its dequantization of the same codes read as one flat row
        flat = copy.copy(state)
        flat.shape = torch.Size([state.shape.numel()])
        assert got.dtype == dtype and torch.equal(got.view(-1), bnbf.dequantize_4bit(packed, flat).view(-1))
        made.append(got.data_ptr())
    assert made[0] == made[2] != made[1]  # one buffer per shape, the same one on every call


def _qlora(make_doc: Callable[..., dict[str, Any]]) -> Any:
    return _built(make_doc, "qlora", model={"quantization": "4bit"},
                  lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})


def test_fused_qlora_after_a_forward_without_gradients(make_doc: Callable[..., dict[str, Any]]) -> None:
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights in place on a forward without gradients (lite-ft's
    loss check runs one before training, evaluations more); the fused blocks then still compute peft's result
    (before the fix: loss 22 instead of 2 on SmolLM2). On other CPUs this checks the plain order of events."""
    built = _qlora(make_doc)
    batch = _batch(len(built.tokenizer))
    built.model.eval()
    with torch.no_grad():
        built.model(**batch, use_cache=False)
    _assert_same(built.model, len(built.tokenizer))


def test_fused_qlora_refuses_a_repacked_weight(make_doc: Callable[..., dict[str, Any]]) -> None:
    """A weight repacked anyway (by hand here, with bitsandbytes' own function, on any CPU) stops the step with
    what to change, instead of training on garbage."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    built = _qlora(make_doc)
    w = next(m for m in built.model.modules() if isinstance(m, bnb.nn.Linear4bit)).weight  # bnb's, not peft's
    w.data, w.quant_state = bnbf._convert_weight_packed_for_cpu(w.data, w.quant_state)
    with pytest.raises(RuntimeError, match="train.fused_lora: false"):
        _loss_and_grads(built.model, _batch(len(built.tokenizer)))


def test_fused_blocks_under_gradient_checkpointing(make_doc: Callable[..., dict[str, Any]]) -> None:
    built = _built(make_doc, lora={"r": 4, "alpha": 8, "dropout": 0.0}, train={"gradient_checkpointing": True})
    assert built.fused_lora.startswith("on:")
    _assert_same(built.model, len(built.tokenizer))


def _peak_live_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """The most bytes of tensors alive at once over one forward and backward (weights and gradients left out)."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, use_cache=False).loss.backward()  # gradients exist before counting, as after a first step
    with LiveBytes(known=[*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]) as live:
        model(**batch, use_cache=False).loss.backward()
    return live.peak


def test_gradient_checkpointing_lowers_the_fused_blocks_peak(make_doc: Callable[..., dict[str, Any]]) -> None:
    """transformers checkpoints a decoder layer's class forward; the fused path replaces the instance's forward,
    so it checkpoints itself: with the setting on, the same step keeps far fewer bytes alive at its peak."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    gen = torch.Generator().manual_seed(2)
    peaks = {}
    for ckpt in (False, True):
        built = _built(make_doc, lora=lora, model={"attention": "sdpa"}, train={"gradient_checkpointing": ckpt})
        ids = torch.randint(4, len(built.tokenizer), (4, 96), generator=gen)
        assert built.fused_lora.startswith("on:")
        peaks[ckpt] = _peak_live_bytes(built.model, {"input_ids": ids, "labels": ids})
    assert peaks[True] < 0.8 * peaks[False], peaks


def _saved_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for the backward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch, use_cache=False).loss.backward()
    return sum(seen.values())


def test_fused_blocks_keep_fewer_tensors(make_doc: Callable[..., dict[str, Any]]) -> None:
    built = _built(make_doc, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    batch = _batch(len(built.tokenizer))
    fused_lora.set_enabled(built.model, False)
    unfused = _saved_bytes(built.model, batch)
    fused_lora.set_enabled(built.model, True)
    assert _saved_bytes(built.model, batch) < 0.8 * unfused


def test_adapter_merge_and_files_are_peft_s(make_doc: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    built = _built(make_doc, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    ref = _built(make_doc, lora={"r": 4, "alpha": 8, "dropout": 0.0}, train={"fused_lora": False})
    assert ref.fused_lora.startswith("off")
    ours, theirs = get_peft_model_state_dict(built.model), get_peft_model_state_dict(ref.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    built.model.save_pretrained(tmp_path / "a")
    ref.model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    batch = _batch(len(built.tokenizer))
    merged, merged_ref = built.model.merge_and_unload(), ref.model.merge_and_unload()
    for (name, a), (_, b) in zip(merged.state_dict().items(), merged_ref.state_dict().items()):
        assert torch.equal(a, b), name
    # the merged model has no adapters left: its layers, still patched, take the model's own path
    for model in (merged, merged_ref):
        model.train()
    with torch.enable_grad():
        assert torch.equal(merged(**batch, use_cache=False).loss, merged_ref(**batch, use_cache=False).loss)


def test_generation_is_unchanged(make_doc: Callable[..., dict[str, Any]]) -> None:
    built = _built(make_doc, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    model = built.model.eval()
    ids = _batch(len(built.tokenizer))["input_ids"][:1]
    fused_lora.set_enabled(model, False)
    ref = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    other = copy.deepcopy(model)
    fused_lora.set_enabled(other, True)
    assert torch.equal(other.generate(input_ids=ids, max_new_tokens=5, do_sample=False), ref)


def test_unsupported_settings_fall_back_with_a_note(make_doc: Callable[..., dict[str, Any]],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    built = _built(make_doc, lora={"r": 4, "alpha": 8, "dropout": 0.1})
    assert built.fused_lora.startswith("0 of 2 decoder layers fused") and "lora.dropout > 0" in built.fused_lora
    assert "train.fused_lora: 0 of 2" in capsys.readouterr().err
    bert = build(load_recipe(document=make_doc("classification", "lora")), num_labels=2)
    assert "no decoder layers" in bert.fused_lora


def test_a_layer_of_another_kind_is_named(make_doc: Callable[..., dict[str, Any]]) -> None:
    built = _built(make_doc, lora={"r": 4, "alpha": 8, "dropout": 0.0}, train={"fused_lora": False})
    layer = built.model.base_model.model.model.layers[0]
    layer.__class__ = type("OtherDecoderLayer", (type(layer),), {})
    report = fused_lora.install(built.model)
    assert report.fused_layers == 1 and report.total_layers == 2
    assert "OtherDecoderLayer is not a supported decoder layer" in report.describe()


def test_model_attention_sdpa_keeps_torch_s_kernel(make_doc: Callable[..., dict[str, Any]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """model.attention: sdpa asks for PyTorch's SDPA: the fused layers then leave lite-ft's attention kernel out
    (and still equal peft's path)."""
    built = _built(make_doc, model={"attention": "sdpa"}, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    monkeypatch.setattr(fused_lora.attention, "causal_attention", lambda *a: pytest.fail("lite-ft's kernel ran"))
    _assert_same(built.model, len(built.tokenizer))


@pytest.mark.parametrize("policy", ["auto", "recompute"])
def test_train_attention_weights_reaches_the_attention_kernel(policy: str, make_doc: Callable[..., dict[str, Any]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """train.attention_weights goes from the recipe to every fused layer's attention call."""
    built = _built(make_doc, train={"attention_weights": policy}, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    seen: list[str] = []
    kernel = fused_lora.attention.causal_attention
    monkeypatch.setattr(fused_lora.attention, "causal_attention", lambda *a: seen.append(a[-1]) or kernel(*a))
    _loss_and_grads(built.model, _batch(len(built.tokenizer)))
    assert seen == [policy, policy]


def test_bf16_base_multiplies_adapters_in_bf16(make_doc: Callable[..., dict[str, Any]]) -> None:
    """Over a bf16 base the LoRA products run in bf16, as autocast runs them (fused_ops.product_dtype): every matmul
    of the step is bf16, the fp32 adapters still get fp32 gradients, and those are as close to the fp32 model's as
    peft's bf16 path gets (it multiplies the adapters in fp32; here both are 4-5% off in norm on the tiny model)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MatmulDtypes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[torch.dtype] = set()

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_,
                                       torch.ops.aten.bmm):
                self.seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    fp32 = _built(make_doc, lora=lora)
    batch = _batch(len(fp32.tokenizer))
    _, _, exact = _loss_and_grads(fp32.model, batch)
    built = _built(make_doc, model={"dtype": "bfloat16"}, lora=lora)
    assert built.fused_lora == "on: 2 of 2 decoder layers"
    fused_lora.set_enabled(built.model, False)
    _, _, peft = _loss_and_grads(built.model, batch)
    fused_lora.set_enabled(built.model, True)
    with MatmulDtypes() as mode:
        _, _, grads = _loss_and_grads(built.model, batch)
    assert mode.seen == {torch.bfloat16}
    assert grads.keys() == exact.keys() and len(grads) == 2 * 7 * 2
    assert {g.dtype for g in grads.values()} == {torch.float32}

    def worst(got: dict[str, torch.Tensor]) -> float:
        return max(float((got[n] - exact[n]).norm() / exact[n].norm()) for n in exact)

    assert worst(grads) <= 1.5 * worst(peft) and worst(peft) < 0.1
