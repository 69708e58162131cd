"""GGUF file of a merged Llama-architecture causal LM, written with the `gguf` package one tensor at a time, and the
transformers read-back check used where llama.cpp is not installed.

Layout as llama.cpp loads LlamaForCausalLM: tensor names from gguf's TensorNameMap, Q/K rows permuted for
llama.cpp's rotary layout, 1-D tensors (norms) always float32, the tokenizer as `gguf_vocab` writes it. Every
tensor's header entry is laid out before any weight is read; each weight is then fetched (merged), converted and
appended before the next, so writing holds about one tensor, not the model.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM

from lite_ft.errors import LiteFTError
from lite_ft.export.gguf_vocab import add_tokenizer, pre_tokenizer, tokenizer_json
from lite_ft.export.verify import compare

FILE = "model.gguf"
WRITTEN_TYPES = ("f32", "f16", "q8_0")  # written here; the k-quants come from llama.cpp's quantizer (llama_cpp.py)
# Round-trip bound of the transformers read-back, as a fraction of the logit scale: f32 stores the weights exactly;
# f16 rounds each weight to 11 significant bits; q8_0 stores blocks of 32 weights as int8 with one scale.
TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "q8_0": 1.5e-1}
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_Q8 = gguf.GGMLQuantizationType.Q8_0


@dataclass(frozen=True)
class Tensors:
    """The weights to write, fetched one at a time: transformers names and shapes in file order, and a function
    that returns one of them (merged, if it has a LoRA update) as a float32 tensor."""

    shapes: dict[str, tuple[int, ...]]
    get: Callable[[str], torch.Tensor]


def check_supported(config: Any, tokenizer: Any, task: str, source: Path | None) -> dict[str, Any]:
    """LiteFTError, before anything is written, for what this writer cannot export faithfully; else the
    pre-tokenizer to write (gguf_vocab.pre_tokenizer)."""
    fix = "; use --format safetensors for this model"
    if task == "classification" or getattr(config, "model_type", None) != "llama":
        raise LiteFTError(f"GGUF export supports Llama-architecture causal LMs only (model_type llama, not "
                          f"{getattr(config, 'model_type', '?')} for task {task}){fix}")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    biases = getattr(config, "attention_bias", False), getattr(config, "mlp_bias", False)
    if rope != "default" or any(biases):
        raise LiteFTError(f"GGUF export writes plain Llama layers; this model uses rope type {rope!r}, "
                          f"attention_bias {biases[0]}, mlp_bias {biases[1]}{fix}")
    spec = tokenizer_json(tokenizer)
    kinds = json.dumps(spec.get("pre_tokenizer"))
    if spec["model"]["type"] != "BPE" or '"ByteLevel"' not in kinds or spec["model"].get("byte_fallback"):
        raise LiteFTError("GGUF export writes gpt2-style tokenizers (byte-level BPE, as SmolLM2, Llama 3 and Qwen "
                          f"use); this tokenizer is {spec['model']['type']} with pre-tokenizer {kinds[:80]}{fix}")
    if len(tokenizer) > config.vocab_size:
        raise LiteFTError(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} "
                          f"embeddings{fix}")
    return pre_tokenizer(tokenizer, source, config.vocab_size)


def write(tensors: Tensors, config: Any, tokenizer: Any, path: Path, gguf_type: str, name: str,
          pre: dict[str, Any]) -> dict[str, Any]:
    """Write the GGUF file at `path` in `gguf_type` (f32, f16, q8_0); return what was written."""
    writer = gguf.GGUFWriter(str(path), "llama")
    _add_hyperparameters(writer, config, name, gguf_type)
    vocab = add_tokenizer(writer, tokenizer, config.vocab_size, pre)
    layout = _layout(tensors, config, gguf_type)
    for entry in layout:
        writer.add_tensor_info(entry.name, entry.byte_shape, np.dtype(np.uint8) if entry.qtype == _Q8 else
                               np.dtype(entry.numpy), entry.nbytes, raw_dtype=entry.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    for entry in layout:
        writer.write_tensor_data(_converted(tensors.get(entry.hf_name), entry, heads, kv_heads))
    writer.close()
    kept = [e.name for e in layout if gguf_type == "q8_0" and e.qtype == gguf.GGMLQuantizationType.F16]
    return {"file": path.name, "type": gguf_type, "bytes": path.stat().st_size, "tensors": len(layout),
            "kept_f16_for_q8_0": kept, "tokenizer": vocab}


@dataclass(frozen=True)
class _Entry:
    hf_name: str
    name: str  # llama.cpp's
    qtype: Any  # GGMLQuantizationType
    numpy: Any  # numpy dtype written
    byte_shape: tuple[int, ...]
    nbytes: int


def _layout(tensors: Tensors, config: Any, gguf_type: str) -> list[_Entry]:
    """Every tensor's llama.cpp name, type and size, from the shapes alone. A tied head is not written:
    llama.cpp reuses token_embd when output.weight is absent."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for hf_name, shape in tensors.shapes.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LiteFTError(f"GGUF export: no llama.cpp name for tensor {hf_name}; this is not a plain Llama "
                              "model, use --format safetensors")
        if len(shape) == 1 or gguf_type == "f32":
            qtype, dtype = gguf.GGMLQuantizationType.F32, np.float32
        elif gguf_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[_Q8][0] == 0:
            qtype, dtype = _Q8, np.uint8
        else:  # f16, and q8_0 tensors whose rows are not whole blocks of 32
            qtype, dtype = gguf.GGMLQuantizationType.F16, np.float16
        byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, qtype)) if qtype == _Q8 else tuple(shape)
        nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
        out.append(_Entry(hf_name, name, qtype, dtype, byte_shape, nbytes))
    return out


def _converted(tensor: torch.Tensor, entry: _Entry, heads: int, kv_heads: int) -> np.ndarray:
    """One weight as llama.cpp stores it: Q/K rows permuted, cast or quantized to the entry's type."""
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if entry.name.endswith("attn_q.weight"):
        data = permute(data, heads, heads)
    elif entry.name.endswith("attn_k.weight"):
        data = permute(data, heads, kv_heads)
    data = np.ascontiguousarray(data)
    if entry.qtype == _Q8:
        return gguf.quants.quantize(data, _Q8)
    return data.astype(entry.numpy, copy=False)


def _add_hyperparameters(writer: Any, config: Any, name: str, gguf_type: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPE[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim * heads != config.hidden_size:  # llama.cpp then needs the per-head sizes spelled out
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds (llama.cpp's k-quants fall back to other types for rows
    that are not whole blocks of 256)."""
    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def permute(weights: np.ndarray, n_head: int, n_kv_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: within each head, the two rotary halves interleaved. transformers' GGUF loader
    applies the inverse (LlamaTensorProcessor._reverse_permute_weights)."""
    if n_kv_head != n_head:
        n_head = n_kv_head
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def load(folder: Path) -> torch.nn.Module:
    """The GGUF read back with transformers (dequantized to float32), as any user would load it."""
    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=FILE, dtype=torch.float32).eval()


def check_roundtrip(merged: list[torch.Tensor], read_back: list[torch.Tensor], gguf_type: str) -> dict[str, Any]:
    """Logits of the GGUF read back with transformers against the merged model; LiteFTError beyond
    TOLERANCE[gguf_type]."""
    figures = compare(merged, read_back)
    bound = TOLERANCE[gguf_type] * figures["logit_scale"]
    if figures["max_abs_diff"] > bound:
        raise LiteFTError(f"GGUF round trip failed: logits read back differ by up to {figures['max_abs_diff']:.4g} "
                          f"(bound {bound:.4g} for {gguf_type}); nothing was written. Try --gguf-type f32")
    return {**figures, "bound": bound}
