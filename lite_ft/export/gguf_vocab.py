"""The tokenizer of a GGUF export as llama.cpp reads it: byte-level BPE tokens and their types, the merges, special
ids, add-BOS/EOS flags and chat template (gguf's SpecialVocab), and the name of the pre-tokenizer.

A GGUF has no tokenizer.json, so llama.cpp splits text before BPE with a regex it picks by the name in
`tokenizer.ggml.pre`. The name is derived from behaviour, as llama.cpp's own converter derives it, not from the
shape of tokenizer.json: the tokenizer splits a fixed probe text, and that split is compared with the split of
each pre-tokenizer llama.cpp implements (built here from the same regexes). Where llama.cpp's converter hashes the
token ids of its probe and so only knows released tokenizers, comparing the split works for any vocabulary. When
the base model came from a GGUF whose vocabulary the run kept, that file's own `tokenizer.ggml.pre` and other
tokenizer keys are carried through. A tokenizer that splits like none of them is refused: llama.cpp would fall
back to its 'default' split and tokenize differently from the model's training.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Regex, pre_tokenizers
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from lite_ft.errors import LiteFTError
from lite_ft.sources import catalog

# Splits llama.cpp implements, as the equivalent `tokenizers` pre-tokenizer: the GPT-2 regex, SmolLM's (each digit
# alone, then GPT-2), and regexes transformers reads GGUF files with. Each was checked against the real llama.cpp
# (tests/export/test_gguf_llama_cpp.py); transformers' "tekken" and "gpt-4o" regexes are left out because
# llama.cpp b9190 splits combining marks (Devanagari vowel signs) otherwise.
_BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
LLAMA_CPP_SPLITS: dict[str, Any] = {
    "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    **{name: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[name]), "isolated"),
                                      _BYTES])
       for name in ("llama-bpe", "qwen2", "qwen35")},
}
# Names llama.cpp (b9190, llama-vocab.cpp) accepts in tokenizer.ggml.pre; a source GGUF's name is carried only if
# it is one of them (anything else fails to load: "unknown pre-tokenizer type").
LLAMA_CPP_NAMES = frozenset({
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
    "deepseek-llm", "deepseek-coder", "deepseek-v3", "gpt-2", "phi-2", "jina-es", "jina-de", "jina-v2-es",
    "jina-v2-de", "jina-v1-en", "jina-v2-code", "roberta-bpe", "falcon", "mpt", "starcoder", "refact", "command-r",
    "qwen2", "deepseek-r1-qwen", "qwen35", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat", "chatglm-bpe",
    "viking", "jais", "tekken", "smollm", "codeshell", "bloom", "gpt3-finnish", "exaone", "chameleon",
    "minerva-7b", "megrez", "gpt-4o", "superbpe", "trillion", "bailingmoe", "seed-coder", "hunyuan", "kimi-k2",
    "grok-2", "mellum", "kanana2"})
# The probe text: digits and numbers, contractions in both cases, runs of spaces, tabs and newlines, punctuation
# runs, several scripts, emoji with joiners and modifiers. Every pair of splits above cuts it differently.
PROBE = ("\n \n\n \t\t x  \t\n   y    z\r\n 3 33 333 4444 55555 1,234,567.89 3.14 12:30 2024-01-31 ½ ² ٣٤\n"
         "I'm sure you'll see we've said don't, can't; she'd they're. 'S 'RE I'VE WE'LL it'D\n"
         "HELLO World!!! ...??? ---=== ''' ``` \"\"\" ((a+b)*c)/d\n"
         "def f(x):\n\treturn  x**2   # square\n"
         "Привет мир Καλημέρα 你好世界 こんにちは 안녕하세요 مرحبا नमस्ते สวัสดี\n"
         "🚀 😶\u200d🌫️ 👍🏽 🇫🇷 ❤️ 🦙🦙 ✅ camelCaseWord HTTPServer résumé naïve")
# tokenizer.* keys this module writes itself; a source GGUF's other tokenizer keys are carried as they are.
_WRITTEN = {"model", "pre", "tokens", "token_type", "merges", "scores", "bos_token_id", "eos_token_id",
            "unknown_token_id", "padding_token_id", "seperator_token_id", "cls_token_id", "mask_token_id",
            "add_bos_token", "add_eos_token", "add_sep_token", "add_space_prefix", "chat_template"}


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's full description; LiteFTError for a slow (sentencepiece / Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LiteFTError("GGUF export needs a fast (tokenizers) tokenizer; use --format safetensors")
    return json.loads(backend.to_str())


def split_name(tokenizer: Any) -> str | None:
    """The llama.cpp pre-tokenizer whose split of PROBE is the tokenizer's own, or None."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None and backend.normalizer.normalize_str(PROBE) != PROBE:
        return None  # llama.cpp does not normalize byte-level text, so it would see other characters
    if backend.pre_tokenizer is None:
        return None
    pieces = backend.pre_tokenizer.pre_tokenize_str(PROBE)
    return next((name for name, pre in LLAMA_CPP_SPLITS.items() if pre.pre_tokenize_str(PROBE) == pieces), None)


def source_gguf(recipe: Any) -> Path | None:
    """The GGUF file the run's base model was converted from (model.source a .gguf or a GGUF catalog model)."""
    source = recipe.model.source
    path = catalog.fetch(source) if source in catalog.CATALOG else Path(source).expanduser()
    return path if path.suffix.lower() == ".gguf" and path.is_file() else None


def _source_tokenizer_keys(path: Path, tokens: list[str]) -> dict[str, Any] | None:
    """The source GGUF's tokenizer.* keys (name -> (value, value type, array type)), its token list and merges
    left out, when that token list is the one being written, else None: another vocabulary's metadata would lie."""
    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None or list(field.contents()) != tokens:
        return None
    keys = {}
    for name, f in reader.fields.items():
        array = f.types[0] == gguf.GGUFValueType.ARRAY
        if name.startswith("tokenizer.") and (not array or name == "tokenizer.ggml.token_type"):
            keys[name] = (f.contents(), f.types[0], f.types[1] if array else None)
    return keys


def pre_tokenizer(tokenizer: Any, source: Path | None, vocab_size: int | None = None) -> dict[str, Any]:
    """The pre-tokenizer name to write (for a model of `vocab_size` embeddings, default the tokenizer's size) and
    where it came from; LiteFTError when llama.cpp would not know it."""
    derived = split_name(tokenizer)
    tokens = token_list(tokenizer, vocab_size or len(tokenizer))[0]
    carried = _source_tokenizer_keys(source, tokens) if source is not None else None
    name = (carried or {}).get("tokenizer.ggml.pre", (None,))[0]
    found = {"split_matches": derived, "carried": carried, "source_pre": name}
    # The source's name unless this tokenizer demonstrably splits otherwise: the run trained with this tokenizer,
    # and llama.cpp must tokenize as it does (a conversion that dropped a split, e.g. SmolLM's digits, shows here).
    if name in LLAMA_CPP_NAMES and (derived is None or derived == name or name not in LLAMA_CPP_SPLITS):
        return {"name": name, "from": f"source GGUF {source.name}", **found}
    if derived is not None:
        why = "split of the probe text"
        if name in LLAMA_CPP_NAMES:
            why += (f"; the source GGUF says {name!r}, but this run's tokenizer splits text like {derived!r}, "
                    "so llama.cpp is told to split as the model was trained")
        return {"name": derived, "from": why, **found}
    pre = json.dumps(tokenizer_json(tokenizer).get("pre_tokenizer"))[:120]
    raise LiteFTError(f"GGUF export: this tokenizer splits text like none of the pre-tokenizers llama.cpp knows "
                      f"({', '.join(LLAMA_CPP_SPLITS)}); its pre-tokenizer is {pre}. llama.cpp would split text "
                      "differently from the model's training, so no GGUF was written; use --format safetensors")


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id (byte-level spelling; ids without a token padded as [PADi]) and llama.cpp token types:
    special added tokens CONTROL, other added tokens USER_DEFINED, padding UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        kind = gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        if i in added:
            kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
        types.append(int(kind))
    return tokens, types


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, pre: dict[str, Any]) -> dict[str, Any]:
    """Write the tokenizer into `writer`; return what was written (for export.json)."""
    tokens, types = token_list(tokenizer, vocab_size)
    carried = pre.get("carried") or {}
    kept = ["tokenizer.ggml.pre"] if pre["from"].startswith("source GGUF") else []
    source_types = carried.get("tokenizer.ggml.token_type", (None,))[0]
    if source_types is not None and len(source_types) == vocab_size:
        types = [int(t) for t in source_types]  # the source's own marking of control tokens, kept as it was
        kept.append("tokenizer.ggml.token_type")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre["name"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = _special_vocab(tokenizer, vocab_size)
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(False)  # byte-level BPE: the space belongs to the token after it
    extra = [key for key in carried if key.split(".")[-1] not in _WRITTEN]
    for key in extra:
        value, vtype, sub = carried[key]
        writer.add_key_value(key, value, vtype, sub_type=sub)
    return {"model": "gpt2", "pre": pre["name"], "pre_from": pre["from"], "split_matches": pre["split_matches"],
            "source_pre": pre.get("source_pre"),
            "tokens": len(tokens), "merges": len(special.merges), "special_ids": special.special_token_ids,
            "add_special": special.add_special_token, "chat_template": special.chat_template is not None,
            "carried_from_source": kept + extra}


def _special_vocab(tokenizer: Any, vocab_size: int) -> Any:
    """gguf's SpecialVocab read from the tokenizer as saved (merges, special ids, chat template), with add-BOS and
    add-EOS set from what the tokenizer does to a text, which is what llama.cpp must reproduce."""
    with tempfile.TemporaryDirectory(prefix="lite-ft-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    ids = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and len(ids) > len(bare) and \
        ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and len(ids) > len(bare) and \
        ids[-1] == tokenizer.eos_token_id
    if not special.merges:
        raise LiteFTError("GGUF export: the tokenizer has no BPE merges; llama.cpp cannot tokenize with it")
    return special
