"""Build the model a recipe asks for: source -> (GGUF conversion) -> quantization -> full | LoRA | QLoRA.

The methods differ only here; the training loop is the same for all of them.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lite_ft import catalog
from lite_ft.config import Recipe
from lite_ft.errors import LiteFTError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class Built:
    """A model ready to train, its tokenizer, and the facts the run reports about it."""

    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    source_path: str


def pick_device(choice: str = "auto") -> torch.device:
    """cuda when asked or available, else cpu. Asking for cuda without one is an error, not a silent fallback."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise LiteFTError("train.device is cuda but no CUDA GPU is visible; set train.device auto or cpu")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere: CPUs without AVX512-BF16 run bf16 matmuls ~400x slower."""
    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_source(source: str, allow_pickle: bool = False) -> str:
    """Turn model.source into something from_pretrained takes: a local folder or a reachable Hub id."""
    if source in catalog.CATALOG:
        source = str(catalog.fetch(source))
    path = Path(source).expanduser()
    if source.lower().endswith(".gguf"):
        if not path.is_file():
            raise LiteFTError(f"model.source: GGUF file {source} not found")
        return str(convert_gguf(path))
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise LiteFTError(f"model.source: {source} is not a model folder (no config.json in it); point it at a "
                              "folder written by save_pretrained, a .gguf file, a Hub id or a catalog name")
        _check_weights(path, allow_pickle)
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise LiteFTError(f"model.source: {source} does not exist; use an existing folder, a .gguf file, a Hub id "
                          f"or a catalog name ({', '.join(catalog.CATALOG)})")
    _require_hub(source, "model", f"catalog models work offline: {', '.join(catalog.CATALOG)}")
    return source


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in names) or allow_pickle:
        return
    if any(n.endswith(_PICKLE_SUFFIXES) for n in names):
        raise LiteFTError(f"model.source: {folder} holds weights only in pickle format (.bin/.pt), which can run "
                          "arbitrary code when loaded; convert them to safetensors, or set model.allow_pickle true "
                          "if you trust the files")


def _require_hub(repo_id: str, what: str, alternatives: str) -> None:
    """Fail in seconds, not after minutes of retries, when the Hub cannot be reached and nothing is cached."""
    from huggingface_hub import constants, try_to_load_from_cache

    if what == "model" and isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: transformers finds it without the network
    if constants.HF_HUB_OFFLINE:
        raise LiteFTError(f"{what} {repo_id!r} is a Hub id but HF_HUB_OFFLINE is set and it is not cached; "
                          f"{alternatives}, or use a local path")
    host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    try:
        socket.create_connection((host.split(":")[0], 443), timeout=5).close()
    except OSError as exc:
        raise LiteFTError(f"{what} {repo_id!r} looks like a Hub id, but {host} cannot be reached ({exc}) and it is "
                          f"not in the local Hugging Face cache; {alternatives}, or use a local path") from None


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a cached safetensors folder (so bitsandbytes can quantize it later)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = catalog.cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file() and (target / ".complete").exists():
        return target
    print(f"lite-ft: converting {path.name} to safetensors (once; cached in {target}) ...", file=sys.stderr,
          flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LiteFTError(f"model.source: cannot load {path.name} through transformers' GGUF support ({exc}); "
                          "its architecture may not be supported there") from None
    # The dequantized weights are ordinary tensors; drop the GGUF marker so the folder loads like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / ".complete").write_text(str(path.resolve()) + "\n")
    if target.exists():
        import shutil
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


# Classification heads are new and fully trained (peft's modules_to_save): they stay in full precision.
HEADS = ["classifier", "score"]


def quantization_config(quantization: str, dtype: torch.dtype, skip: list[str] | None = None) -> Any:
    """bitsandbytes settings: 8-bit LLM.int8, or 4-bit NF4 with double quantization computing in `dtype`; modules
    named in `skip` are left unquantized."""
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    return None


def load_tokenizer(path: str, recipe: Recipe) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=recipe.model.revision,
                                        trust_remote_code=recipe.model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build(recipe: Recipe, num_labels: int | None = None, source_path: str | None = None) -> Built:
    """Load, quantize and wrap the model for the recipe's task and method."""
    device = pick_device(recipe.train.device)
    dtype = pick_dtype(recipe.model.dtype, device)
    path = source_path or resolve_source(recipe.model.source, recipe.model.allow_pickle)
    tokenizer = load_tokenizer(path, recipe)
    model = load_base(path, recipe, device, dtype, num_labels, tokenizer.pad_token_id)
    if recipe.method in ("lora", "qlora"):
        model = attach_lora(model, recipe)
    elif recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Built(model=model, tokenizer=tokenizer, device=device, dtype=dtype, source_path=path)


def load_base(path: str, recipe: Recipe, device: torch.device, dtype: torch.dtype, num_labels: int | None,
              pad_token_id: int | None) -> torch.nn.Module:
    """The base model in `dtype`, quantized if asked, on `device`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quant = quantization_config(recipe.model.quantization or "none", dtype,
                                skip=HEADS if recipe.task == "classification" else None)
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
    return model


def attach_lora(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """Freeze the base and add PEFT LoRA adapters (B starts at zero, so step 0 changes nothing)."""
    from peft import (
        LoraConfig,
        TaskType,
        get_peft_model,
        prepare_model_for_kbit_training,
    )

    if recipe.model.quantization in ("8bit", "4bit"):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
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
