"""GGUF export of a merged Llama-architecture causal LM, written with the `gguf` package (no llama.cpp build),
plus an Ollama Modelfile; and the round-trip check that reads the file back with transformers.

Layout follows llama.cpp's convert_hf_to_gguf.py for LlamaForCausalLM: llama tensor names, Q/K rows permuted
for llama.cpp's rotary layout, 1-D tensors (norms) always float32, a gpt2-style (byte-level BPE) vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from lite_ft.errors import LiteFTError
from lite_ft.export.verify import compare

GGUF_TYPES = ("f32", "f16", "q8_0")
# Round-trip bound, as a fraction of the logit scale: f32 stores the weights exactly (only the reading path
# differs); f16 rounds each weight to 11 significant bits; q8_0 stores blocks of 32 weights as int8 with one
# scale (~0.4% per weight, more on outliers).
TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "q8_0": 1.5e-1}
FILE = "model.gguf"
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def check_supported(config: Any, tokenizer: Any, task: str) -> None:
    """LiteFTError, before anything is written, for what this writer cannot export faithfully."""
    fix = "; use --format safetensors for this model"
    if task == "classification" or getattr(config, "model_type", None) != "llama":
        raise LiteFTError(f"GGUF export supports Llama-architecture causal LMs only (model_type llama, not "
                          f"{getattr(config, 'model_type', '?')} for task {task}){fix}")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    biases = getattr(config, "attention_bias", False), getattr(config, "mlp_bias", False)
    if rope != "default" or any(biases):
        raise LiteFTError(f"GGUF export writes plain Llama layers; this model uses rope type {rope!r}, "
                          f"attention_bias {biases[0]}, mlp_bias {biases[1]}{fix}")
    model = _tokenizer_json(tokenizer)
    kinds = json.dumps(model.get("pre_tokenizer"))
    if model["model"]["type"] != "BPE" or '"ByteLevel"' not in kinds:
        raise LiteFTError("GGUF export writes gpt2-style tokenizers (byte-level BPE, as SmolLM2, Llama 3 and Qwen "
                          f"use); this tokenizer is {model['model']['type']} with pre-tokenizer {kinds[:80]}{fix}")
    if len(tokenizer) > config.vocab_size:
        raise LiteFTError(f"the tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size} "
                          f"embeddings{fix}")


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LiteFTError("GGUF export needs a fast (tokenizers) tokenizer; use --format safetensors")
    return json.loads(backend.to_str())


def write(model: torch.nn.Module, tokenizer: Any, folder: Path, gguf_type: str, name: str) -> dict[str, Any]:
    """Write folder/model.gguf and folder/Modelfile; return what was written."""
    config = model.config
    writer = gguf.GGUFWriter(str(folder / FILE), "llama")
    _add_hyperparameters(writer, config, name, gguf_type)
    notes = _add_tokenizer(writer, tokenizer, config.vocab_size)
    fallbacks = _add_tensors(writer, model, gguf_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "Modelfile").write_text(modelfile(tokenizer), encoding="utf-8")
    return {"file": FILE, "type": gguf_type, "bytes": (folder / FILE).stat().st_size, "modelfile": "Modelfile",
            "tolerance_relative": TOLERANCE[gguf_type], "kept_f16_for_q8_0": fallbacks, "notes": notes}


def _add_hyperparameters(writer: Any, config: Any, name: str, gguf_type: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    writer.add_name(name)
    writer.add_file_type(file_type)
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


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> list[str]:
    """gpt2-style vocabulary: byte-level token strings by id (unused ids padded), types, merges, special ids."""
    spec = _tokenizer_json(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        kind = gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    pre, notes = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                          ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        value = getattr(tokenizer, f"{token_id}_token_id", None)
        if value is not None:
            add(int(value))
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    writer.add_add_space_prefix(False)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)
    return notes


def _pre_tokenizer_name(pre: Any) -> tuple[str, list[str]]:
    """llama.cpp's name for how text is split before BPE; it matters to llama.cpp, which has no tokenizer.json."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2", []
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm", []  # SmolLM's own split (GPT-2 regex, digits one by one), as llama.cpp names it
    if kinds[:1] == ["Split"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        names = [n for n, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == pattern]
        if names:
            return names[0], []
    return "default", [f"pre-tokenizer {kinds} not recognised: written as 'default'; llama.cpp may split text "
                       "slightly differently from transformers"]


def _add_tensors(writer: Any, model: torch.nn.Module, gguf_type: str) -> list[str]:
    """Every weight under its llama.cpp name and type; returns the tensors kept in f16 because q8_0 needs rows
    of a multiple of 32 values."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    fallbacks = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        name = gguf_name(hf_name)
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("attn_q.weight"):
            data = permute(data, heads, heads)
        elif name.endswith("attn_k.weight"):
            data = permute(data, heads, kv_heads)
        if data.ndim == 1 or gguf_type == "f32":
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif gguf_type == "q8_0" and data.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            if gguf_type == "q8_0":
                fallbacks.append(name)
            writer.add_tensor(name, data.astype(np.float16))
    return fallbacks


def gguf_name(hf_name: str) -> str:
    """transformers Llama parameter name -> llama.cpp tensor name (model.layers.3.mlp.up_proj.weight ->
    blk.3.ffn_up.weight)."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    parts = stem.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _LAYER:
        return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:])]}.{suffix}"
    raise LiteFTError(f"GGUF export: no llama.cpp name for tensor {hf_name}; this is not a plain Llama model, use "
                      "--format safetensors")


def permute(weights: np.ndarray, n_head: int, n_kv_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: within each head, the two rotary halves interleaved. transformers' GGUF loader
    applies the inverse (LlamaTensorProcessor._reverse_permute_weights)."""
    if n_kv_head != n_head:
        n_head = n_kv_head
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def modelfile(tokenizer: Any) -> str:
    """An Ollama Modelfile: FROM the GGUF, the chat template in Go-template form, stop at end-of-turn tokens."""
    template = _go_template(tokenizer)
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in template]
    stops = list(dict.fromkeys([t for t in [tokenizer.eos_token, *specials] if t]))
    lines = [f"FROM ./{FILE}", "", f'TEMPLATE """{template}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(t)}" for t in stops]
    return "\n".join(lines) + "\n"


def _go_template(tokenizer: Any) -> str:
    """Render the Jinja chat template with marker messages and put Ollama's {{ .System }} / {{ .Prompt }} where
    the markers land: exact for ChatML and other fixed-layout templates, whatever their default system text."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return "{{ .Prompt }}"

    def render(messages: list[dict[str, str]]) -> str | None:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template may refuse a system turn; jinja raises many types
            return None

    user = render([{"role": "user", "content": "\x01PROMPT\x01"}])
    both = render([{"role": "system", "content": "\x01SYSTEM\x01"}, {"role": "user", "content": "\x01PROMPT\x01"}])
    if user is None or "\x01PROMPT\x01" not in user or "{{" in user:
        return "{{ .Prompt }}"

    def go(text: str) -> str:
        return text.replace("\x01PROMPT\x01", "{{ .Prompt }}").replace("\x01SYSTEM\x01", "{{ .System }}")
    if both is None or "\x01SYSTEM\x01" not in both:
        return go(user)
    return "{{ if .System }}" + go(both) + "{{ else }}" + go(user) + "{{ end }}"


def load(folder: Path) -> torch.nn.Module:
    """The GGUF read back with transformers (dequantized to float32), as any user would load it."""
    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=FILE, dtype=torch.float32).eval()


def check_roundtrip(merged: list[torch.Tensor], read_back: list[torch.Tensor], gguf_type: str) -> dict[str, Any]:
    """Logits of the GGUF read back against the merged model; LiteFTError beyond TOLERANCE[gguf_type]."""
    figures = compare(merged, read_back)
    bound = TOLERANCE[gguf_type] * figures["logit_scale"]
    if figures["max_abs_diff"] > bound:
        raise LiteFTError(f"GGUF round trip failed: logits read back differ by up to {figures['max_abs_diff']:.4g} "
                          f"(bound {bound:.4g} for {gguf_type}); nothing was written. Try --gguf-type f32")
    return {**figures, "bound": bound}
