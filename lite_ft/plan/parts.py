"""The model a recipe builds, replayed on the `meta` device from its config.json alone, and what its tensors weigh:
frozen weights by kind (fp32 / bf16 / 8-bit / NF4 with its quantization constants), trainable parameters,
gradients and optimizer state, in bytes.

The structure (which layers, which LoRA adapters, tied embeddings, classification heads) comes from building the
real transformers + peft model on meta tensors; the quantized layouts are bitsandbytes' and are computed here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from lite_ft.model import HEADS, install_fused_lora, unquantized_dtype
from lite_ft.recipe.schema import Recipe

MIB = 1024 * 1024
NF4_BLOCK = 64  # values per 4-bit block (one absmax each)
NF4_BLOCK2 = 256  # double quantization: absmaxes per second-level block (one fp32 scale each)
ADAM8_BLOCK = 256  # bitsandbytes' 8-bit optimizer: values per block, one fp32 absmax per block and state
ADAM8_MIN = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this (min_8bit_size)


@dataclass
class MetaModel:
    """The recipe's model on meta tensors, and the facts planning needs about it."""

    model: torch.nn.Module
    config: Any
    quantized: dict[str, int]  # module name -> values of each linear layer bitsandbytes would quantize
    quantized_rows: dict[str, int]  # module name -> output rows (8-bit keeps one fp32 scale per row)


def load_config(path: str, recipe: Recipe) -> Any:
    """config.json of the model folder (all planning needs: no weights file is opened)."""
    return AutoConfig.from_pretrained(path, revision=recipe.model.revision,
                                      trust_remote_code=recipe.model.trust_remote_code)


def build_meta(config: Any, recipe: Recipe, weights: torch.dtype, num_labels: int | None, device: str = "meta"
               ) -> MetaModel:
    """The model lite_ft.model.build would make, on meta tensors: base in `weights`, LoRA adapters in fp32,
    gradient checkpointing as asked. Layers bitsandbytes would quantize are recorded, and stay in `weights` here
    (for the activations they behave as frozen linear layers computing in the compute dtype). `device` "cpu"
    builds the same model with real (random) weights, for tests."""
    kwargs: dict[str, Any] = {"dtype": weights}
    if recipe.model.attention != "auto":
        kwargs["attn_implementation"] = recipe.model.attention
    with torch.device(device):
        if recipe.task == "classification":
            config.num_labels = num_labels or 2
            model = AutoModelForSequenceClassification.from_config(config, **kwargs)
        else:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    quantized, rows = _quantizable(model, recipe)
    for name in quantized:
        _compute_like_bitsandbytes(model.get_submodule(name))
    if recipe.method in ("lora", "qlora"):
        for p in model.parameters():
            p.requires_grad_(False)
        if recipe.model.quantization in ("8bit", "4bit"):
            for name, p in model.named_parameters():  # as lite_ft.model.attach_lora keeps them
                if name.rsplit(".", 1)[0] not in quantized:
                    p.data = p.data.to(unquantized_dtype(name, p.dtype))
        if recipe.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        task_type = TaskType.SEQ_CLS if recipe.task == "classification" else TaskType.CAUSAL_LM
        model = get_peft_model(model, LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha,
                                                 lora_dropout=recipe.lora.dropout,
                                                 target_modules=recipe.lora.target_modules, task_type=task_type))
        install_fused_lora(model, recipe)  # as the run does: the fused blocks save fewer activations
    elif recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return MetaModel(model=model, config=config, quantized=quantized, quantized_rows=rows)


def _compute_like_bitsandbytes(layer: torch.nn.Module) -> None:
    """bitsandbytes' layers cast their input to the compute dtype and their output back to the input's dtype
    (after peft casts the norms and embeddings to fp32, the residual stream is fp32 around 16-bit matmuls)."""
    def cast_in(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        module.input_dtype = args[0].dtype
        return (args[0].to(module.weight.dtype), *args[1:])

    def cast_out(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out.to(module.input_dtype)

    layer.register_forward_pre_hook(cast_in)
    layer.register_forward_hook(cast_out)


def _quantizable(model: torch.nn.Module, recipe: Recipe) -> tuple[dict[str, int], dict[str, int]]:
    """Linear layers transformers hands to bitsandbytes: all but the output layer and the classification heads."""
    if recipe.model.quantization not in ("8bit", "4bit"):
        return {}, {}
    head = model.get_output_embeddings() if recipe.task != "classification" else None
    skip = set(HEADS) if recipe.task == "classification" else {"lm_head"}
    values, rows = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and name.split(".")[-1] not in skip \
                and not any(part in skip for part in name.split(".")):
            values[name] = module.weight.numel()
            rows[name] = module.weight.shape[0]
    return values, rows


def quantized_bytes(values: int, rows: int, kind: str) -> int:
    """Bytes of one bitsandbytes layer: NF4 with double quantization (packed 4-bit values, an 8-bit absmax per 64
    values, an fp32 scale per 256 absmaxes, the 16-entry NF4 and 256-entry absmax fp32 code books, an offset) or
    LLM.int8 (int8 values, fp32 row scales)."""
    if kind == "4bit":
        blocks = -(-values // NF4_BLOCK)
        return values // 2 + blocks + 4 * -(-blocks // NF4_BLOCK2) + 16 * 4 + 256 * 4 + 4
    return values + 4 * rows


def static_parts(meta: MetaModel, recipe: Recipe) -> dict[str, float]:
    """MiB of what lives through the whole run: frozen weights by kind, trainable parameters, their gradients and
    the optimizer state (AdamW: two fp32 moments; adamw8bit: two 8-bit moments plus block scales)."""
    quant = recipe.model.quantization if recipe.model.quantization in ("8bit", "4bit") else None
    frozen: dict[str, float] = {}
    trainable = grads = optimizer = 0
    seen: set[int] = set()
    owners = {id(m.weight): name for name, m in meta.model.named_modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor)}
    prefix = "base_model.model." if hasattr(meta.model, "peft_config") else ""
    for p in meta.model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        owner = owners.get(id(p), "")
        base_name = owner.removeprefix(prefix)
        base_name = base_name.replace(".base_layer", "")
        n = p.numel()
        if p.requires_grad:
            trainable += n * p.element_size()
            grads += n * p.element_size()
            optimizer += _adam_bytes(n, recipe.train.optimizer)
        elif quant and base_name in meta.quantized:
            kind = "4-bit nf4" if quant == "4bit" else "8-bit"
            frozen[kind] = frozen.get(kind, 0) + quantized_bytes(n, meta.quantized_rows[base_name], quant)
        else:
            kind = str(p.dtype).replace("torch.", "")
            frozen[kind] = frozen.get(kind, 0) + n * p.element_size()
    for b in meta.model.buffers():
        kind = str(b.dtype).replace("torch.", "")
        frozen[kind] = frozen.get(kind, 0) + b.numel() * b.element_size()
    parts = {f"weights ({k})": v / MIB for k, v in frozen.items() if v}
    parts.update({"trainable parameters": trainable / MIB, "gradients": grads / MIB,
                  "optimizer state": optimizer / MIB})
    return parts


def _adam_bytes(n: int, optimizer: str) -> int:
    if optimizer == "adamw8bit" and n >= ADAM8_MIN:
        return 2 * n + 2 * 4 * -(-n // ADAM8_BLOCK)
    return 2 * 4 * n


def parameter_counts(meta: MetaModel) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights once."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in meta.model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total
