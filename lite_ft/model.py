"""Build the model a recipe asks for: a resolved source -> quantization -> full | LoRA | QLoRA.

The methods differ only here; the training loop is the same for all of them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from lite_ft.errors import LiteFTError
from lite_ft.recipe.precision import Placement, Precision, place
from lite_ft.recipe.schema import Recipe
from lite_ft.sources.resolve import resolve_source
from lite_ft.training import fused_lora
from lite_ft.training.fused_ops import keep_standard_layout


@dataclass
class Built:
    """A model ready to train, its tokenizer, and the facts the run reports about it."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    precision: Precision
    source_path: str
    fused_lora: str = "off"  # train.fused_lora: what lite_ft.training.fused_lora.install did, for metrics.json

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.compute


# Classification heads are new and fully trained (peft's modules_to_save): they stay in full precision.
HEADS = ["classifier", "score"]


def quantization_config(quantization: str, dtype: torch.dtype, skip: list[str] | None = None,
                        fsdp: bool = False) -> Any:
    """bitsandbytes settings: 8-bit LLM.int8, or 4-bit NF4 with double quantization computing in `dtype`; modules
    named in `skip` are left unquantized. Under FSDP the 4-bit weights are stored in `dtype` too
    (bnb_4bit_quant_storage): FSDP shards tensors of one dtype, and the default uint8 storage silently trains
    nothing (loss 0 or NaN) or saves no memory."""
    if quantization == "8bit":
        if fsdp:
            raise LiteFTError("train.fsdp with model.quantization 8bit is not supported (LLM.int8 weights cannot be "
                              "sharded); use 4bit (qlora) or no quantization")
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quantization == "4bit":
        storage = {"bnb_4bit_quant_storage": dtype} if fsdp else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip, **storage)
    return None


def load_tokenizer(path: str, recipe: Recipe) -> Any:
    """The source's tokenizer, with a pad token (eos, else unk) where it has none."""
    tok = AutoTokenizer.from_pretrained(path, revision=recipe.model.revision,
                                        trust_remote_code=recipe.model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build(recipe: Recipe, placement: Placement | None = None, num_labels: int | None = None,
          source_path: str | None = None) -> Built:
    """Load, quantize and wrap the model for the recipe's task and method, stored as `placement` says (commands
    resolve it once and pass it; a library caller may leave it to be resolved from the recipe here)."""
    placement = placement or place(recipe)
    device, precision = placement.device, placement.precision
    path = source_path or resolve_source(recipe.model.source, recipe.model.allow_pickle)
    tokenizer = load_tokenizer(path, recipe)
    model = load_base(path, recipe, device, precision.weights, num_labels, tokenizer.pad_token_id)
    for module in model.modules():  # bitsandbytes' own 4-bit layers (peft wraps them later)
        if type(module).__name__ == "Linear4bit":
            keep_standard_layout(module)
    fused = "off"
    if recipe.method in ("lora", "qlora"):
        model = attach_lora(model, recipe, precision.weights)
        fused = fuse_lora(model, recipe)
    elif recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Built(model=model, tokenizer=tokenizer, device=device, precision=precision, source_path=path,
                 fused_lora=fused)


def install_fused_lora(model: torch.nn.Module, recipe: Recipe) -> str:
    """train.fused_lora: route the decoder layers through the fused LoRA blocks where they apply, as the recipe
    asks (lite-ft plan's replay calls it too, so that it runs what the run runs); returns what was done."""
    if not recipe.train.fused_lora:
        return "off (train.fused_lora: false)"
    if recipe.train.fsdp:
        return "off: not with train.fsdp (sharded weights are gathered per module, outside the fused blocks)"
    return fused_lora.install(model, own_attention=recipe.model.attention == "auto",
                              attention_weights=recipe.train.attention_weights).describe()


def fuse_lora(model: torch.nn.Module, recipe: Recipe) -> str:
    """install_fused_lora, saying on stderr why a model keeps peft's path where the recipe asked for the fused
    blocks (never silently)."""
    note = install_fused_lora(model, recipe)
    if recipe.train.fused_lora and not note.startswith("on:"):
        print(f"lite-ft: train.fused_lora: {note}", file=sys.stderr)
    return note


def load_base(path: str, recipe: Recipe, device: torch.device, dtype: torch.dtype, num_labels: int | None,
              pad_token_id: int | None) -> torch.nn.Module:
    """The base model in `dtype`, quantized if asked (computing in `dtype`), on `device`."""
    quant = quantization_config(recipe.model.quantization or "none", dtype,
                                skip=HEADS if recipe.task == "classification" else None, fsdp=recipe.train.fsdp)
    kwargs: dict[str, Any] = dict(dtype=dtype, revision=recipe.model.revision,
                                  trust_remote_code=recipe.model.trust_remote_code,
                                  use_safetensors=None if recipe.model.allow_pickle else True)
    if recipe.model.attention != "auto":
        kwargs["attn_implementation"] = recipe.model.attention
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    try:
        if recipe.task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = pad_token_id  # causal LMs find the last real token through it
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # incl. safetensors' and size-mismatch errors
        raise LiteFTError(f"model.source: cannot load the model in {path}: {str(exc).strip()[:600]}\nThe weights "
                          "file may be missing, cut short or corrupt, or config.json may not match the weights; "
                          "download or convert the model again") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":  # not importable by name across safetensors versions
            raise
        raise LiteFTError(f"model.source: the weights in {path} are not a valid safetensors file ({exc}); download "
                          "or convert the model again") from None
    if quant is None:
        model.to(device)
    elif device.type == "cpu":
        own_unquantized_weights(model)
    return model


def own_unquantized_weights(model: torch.nn.Module) -> int:
    """Copy the weights bitsandbytes left unquantized (embeddings, norms, heads) into memory of their own; returns the
    bytes copied. On the CPU they are views of the memory-mapped safetensors file, and while one view lives the whole
    mapping does, with every page that quantizing read: 405 of the 513 MiB of SmolLM2-135M's fp32 file stayed
    resident under QLoRA, as much as LoRA's whole model (its fp32 weights are that file)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in [*model.parameters(), *model.buffers()]:  # tied weights once
        if type(tensor).__name__ not in ("Params4bit", "Int8Params"):  # those were quantized into new memory
            groups.setdefault(tensor.dtype, []).append(tensor)
    copied = 0
    # One block per dtype, not a copy per tensor: copied one by one, the norms landed in glibc's heap and QLoRA's steps
    # took a median 1.12x as long in 7 runs of each (README, speed); with the block 0.93-1.03x in 4, within noise.
    for dtype, tensors in groups.items():
        align = max(64 // tensors[0].element_size(), 1)  # elements: each tensor starts on a 64-byte boundary
        sizes = [-(-t.numel() // align) * align for t in tensors]
        block = torch.empty(sum(sizes), dtype=dtype)
        offset = 0
        for tensor, size in zip(tensors, sizes):
            view = block[offset:offset + tensor.numel()].view(tensor.shape)
            view.copy_(tensor.data)
            tensor.data = view
            offset += size
        copied += block.numel() * block.element_size()
    return copied


def unquantized_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight bitsandbytes leaves unquantized (embeddings, norms, heads) is kept in when a k-bit model
    is stored in `dtype`. peft's prepare_model_for_kbit_training casts them all to fp32, which fp16 needs (its
    norms overflow); under bf16 that made the residual stream, the output layer and the loss fp32 (QLoRA at fp32
    speed on a CPU with AMX: 228 against 403 tok/s for LoRA), so they stay bf16 there, heads excepted."""
    if dtype == torch.bfloat16 and not any(part in HEADS for part in name.split(".")):
        return dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attach_lora(model: torch.nn.Module, recipe: Recipe, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Freeze the base and add PEFT LoRA adapters (B starts at zero, so step 0 changes nothing). peft keeps the
    adapters in fp32 over a 16-bit base (autocast_adapter_dtype), as the precision policy asks; `dtype` is the one
    the base was loaded in."""
    if recipe.model.quantization in ("8bit", "4bit"):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        for name, p in model.named_parameters():  # peft cast every unquantized weight to fp32
            if p.dtype == torch.float32 and unquantized_dtype(name, dtype) != torch.float32:
                p.data = p.data.to(dtype)  # exact: bf16 -> fp32 -> bf16
    elif recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    task_type = TaskType.SEQ_CLS if recipe.task == "classification" else TaskType.CAUSAL_LM
    config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=recipe.lora.target_modules, task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise LiteFTError(f"lora.target_modules: {exc}") from None


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as the number of values they hold."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
