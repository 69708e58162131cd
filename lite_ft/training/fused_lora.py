"""Fused LoRA decoder layers (train.fused_lora): route the training forward of each Llama decoder layer through the
hand-written blocks of lite_ft.training.fused_ops, over the LoRA weights peft created.

peft stays the owner of the adapter: its modules, parameters, state dict, save format and merges are untouched; only
the decoder layer's forward is replaced, on the instance. The fused path runs when it computes what peft's path
would (the same sums; over a bf16 base the LoRA products in bf16, see fused_ops.product_dtype): training mode with
gradients on, no KV cache, no autocast, every projection an unmerged peft LoRA linear with one active adapter,
dropout 0 and no DoRA-style variant, over a plain, 4-bit or 8-bit frozen base.
Anything else (generation, evaluation, a merged or disabled adapter) runs the original forward. A model that can
never take the fused path is reported by install() with the reason (lite-ft records it in metrics.json).
"""
from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lite_ft.training import attention
from lite_ft.training.fused_ops import AttentionInput, AttentionShape, Linear, Mlp, Projection

SUPPORTED_LAYERS = ("LlamaDecoderLayer",)  # SmolLM2 and the tiny test models; others keep peft's path
BASES = ("Linear", "Linear4bit", "Linear8bitLt")
ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class FusedReport:
    """What install() did: how many decoder layers take the fused path, and why the others do not."""

    fused_layers: int = 0
    total_layers: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.fused_layers and self.fused_layers == self.total_layers:
            return f"on: {self.fused_layers} of {self.total_layers} decoder layers"
        head = f"{self.fused_layers} of {self.total_layers} decoder layers fused"
        return head + ("; " + "; ".join(dict.fromkeys(self.notes)) if self.notes else "")


def projection(module: torch.nn.Module) -> Projection | str:
    """The module as a fusable LoRA projection now, or why it is not one."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or not hasattr(module, "get_base_layer"):
        return "not a peft LoRA layer"
    if module.merged or module.disable_adapters:
        return "adapter merged or disabled"
    active = [name for name in module.active_adapters if name in lora_a]
    if len(active) != 1:
        return "not exactly one active adapter"
    name = active[0]
    if name in getattr(module, "lora_variant", {}):
        return "a LoRA variant (e.g. DoRA)"
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return "lora.dropout > 0 (the fused blocks assume no dropout)"
    base = module.get_base_layer()
    if type(base).__name__ not in BASES or base.weight.requires_grad:
        return f"base layer {type(base).__name__} is not a frozen Linear, Linear4bit or Linear8bitLt"
    if getattr(base, "bias", None) is not None and base.bias.requires_grad:
        return "a trainable bias"
    return Projection(base=base, lora_a=module.lora_A[name].weight, lora_b=module.lora_B[name].weight,
                      scale=float(module.scaling[name]))


def layer_parts(layer: torch.nn.Module
                ) -> tuple[tuple[Projection, ...], Projection | None, tuple[Projection, ...]] | str:
    """(q/k/v projections, o_proj or None, gate/up/down projections) of a decoder layer, or why it cannot be fused.
    o_proj is None when it is not a LoRA target or not one the blocks can take: it then runs as its own module."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return "no self_attn / mlp"
    act = getattr(mlp, "act_fn", None)
    if not isinstance(act, torch.nn.SiLU) and type(act).__name__ != "SiLUActivation":
        return f"MLP activation {type(act).__name__} is not SiLU"
    found = {}
    for owner, names in ((attn, ATTENTION), (mlp, MLP)):
        for name in names:
            part = projection(getattr(owner, name, None) or torch.nn.Module())
            if isinstance(part, str):
                return f"{name}: {part}"
            found[name] = part
    if len({found[n].lora_a.dtype for n in ATTENTION}) > 1 or len({found[n].lora_a.dtype for n in MLP}) > 1:
        return "adapters of one block in different dtypes"
    o_proj = projection(getattr(attn, "o_proj", None) or torch.nn.Module())
    return (tuple(found[n] for n in ATTENTION), o_proj if isinstance(o_proj, Projection) else None,
            tuple(found[n] for n in MLP))


def _lora_weights(projs: tuple[Projection, ...]) -> list[torch.Tensor]:
    return [w for p in projs for w in (p.lora_a, p.lora_b)]


def fused_forward(layer: torch.nn.Module, hidden: torch.Tensor, *, attention_mask: torch.Tensor | None,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor], parts: tuple, kwargs: dict[str, Any]
                  ) -> torch.Tensor:
    """One decoder layer through the fused blocks: the attention kernel is lite_ft.training.attention's where it
    computes what the model's SDPA would (the CPU, no dropout), else the model's own; o_proj takes the fused
    single-projection path when it is a fusable LoRA linear, else its own forward."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn_projs, o_proj, mlp_projs = parts
    attn = layer.self_attn
    cfg = attn.config
    shape = AttentionShape(heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=attn.head_dim,
                           eps=layer.input_layernorm.variance_epsilon)
    cos, sin = position_embeddings
    q, k, v = AttentionInput.apply(hidden, layer.input_layernorm.weight, cos, sin, attn_projs, shape,
                                   *_lora_weights(attn_projs))
    dropout = attn.attention_dropout if attn.training else 0.0
    if layer._lite_ft_attention and cfg._attn_implementation == "sdpa" and attention.supports(
            q, k, attention_mask, dropout):
        out = attention.causal_attention(q, k, v, attention_mask, attn.scaling, layer._lite_ft_attention_weights)
    else:
        kernel = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, _eager(attn))
        out, _ = kernel(attn, q, k, v, attention_mask, dropout=dropout, scaling=attn.scaling, **kwargs)
    out = out.reshape(*hidden.shape[:-1], -1).contiguous()
    if o_proj is None:
        hidden = hidden + attn.o_proj(out)
    else:
        hidden = hidden + Linear.apply(out, o_proj, o_proj.lora_a, o_proj.lora_b)
    norm = layer.post_attention_layernorm
    return hidden + Mlp.apply(hidden, norm.weight, norm.variance_epsilon, mlp_projs, *_lora_weights(mlp_projs))


def _eager(attn: torch.nn.Module) -> Callable[..., Any]:
    """The model's own eager attention function, from the module that defines its attention class."""
    import sys

    return sys.modules[type(attn).__module__].eager_attention_forward


def _autocast(device_type: str) -> bool:
    # The meta device (lite-ft plan's replay) has no autocast state to ask for; it never autocasts.
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def _fused_or_original(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The decoder layer's forward (bound to each fused layer): the fused blocks where they compute exactly what
    peft's path would, else the class's own forward."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    position_embeddings = kwargs.get("position_embeddings")
    parts = None
    if (self._lite_ft_fused and len(args) <= 1 and cache is None and position_embeddings is not None
            and self.training and torch.is_grad_enabled() and not _autocast(hidden.device.type)):
        parts = layer_parts(self)  # a string if adapters were merged or disabled since install()
    if parts is None or isinstance(parts, str):
        return type(self).forward(self, *args, **kwargs)
    # position_ids, use_cache and the rest go on to the attention kernel, as the model's attention passes them
    rest = {k: v for k, v in kwargs.items()
            if k not in ("hidden_states", "attention_mask", "cache", "past_key_values", "position_embeddings")}
    block = partial(fused_forward, self, attention_mask=kwargs.get("attention_mask"),
                    position_embeddings=position_embeddings, parts=parts, kwargs=rest)
    if getattr(self, "gradient_checkpointing", False):
        # transformers checkpoints the class's forward, which this instance forward replaces: checkpoint the fused
        # blocks the same way (keep the layer input, recompute the rest in backward), or the setting does nothing
        return self._gradient_checkpointing_func(block, hidden)
    return block(hidden)


def set_enabled(model: torch.nn.Module, on: bool) -> int:
    """Switch the installed fused path on or off (e.g. to measure both in one process); returns the layers."""
    layers = [m for m in model.modules() if hasattr(m, "_lite_ft_fused")]
    for layer in layers:
        layer._lite_ft_fused = on
    return len(layers)


def install(model: torch.nn.Module, own_attention: bool = True, attention_weights: str = "auto") -> FusedReport:
    """Route every fusable decoder layer of a peft LoRA model through the fused blocks; say why others are not.
    `own_attention`: on the CPU, lite_ft.training.attention instead of the model's SDPA (model.attention: auto);
    `attention_weights`: whether that kernel keeps its weights for backward (train.attention_weights)."""
    report = FusedReport()
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
    report.total_layers = len(layers)
    if not layers:
        report.notes.append(f"{type(model).__name__}: no decoder layers with self_attn and mlp; peft's path")
    for layer in layers:
        kind = type(layer).__name__
        if kind not in SUPPORTED_LAYERS:
            report.notes.append(f"{kind} is not a supported decoder layer ({', '.join(SUPPORTED_LAYERS)}); "
                                "peft's path")
            continue
        parts = layer_parts(layer)
        if isinstance(parts, str):
            report.notes.append(f"{kind}: {parts}; peft's path")
            continue
        layer.forward = types.MethodType(_fused_or_original, layer)  # deepcopy rebinds it to the copy
        layer._lite_ft_fused = True
        layer._lite_ft_attention = own_attention
        layer._lite_ft_attention_weights = attention_weights
        report.fused_layers += 1
    return report
