"""Merge a LoRA adapter into its base model tensor by tensor, straight from the safetensors files to new ones.

Memory stays at about one tensor of the model (plus its LoRA pair), whatever the model's size: every output
shard's header is laid out from the base files' headers before any weight is read, and each tensor is then read,
merged (W + scaling * B @ A, in float32, as peft's merge does), cast and written before the next is read.

`make_plan` checks everything first and raises StreamingUnsupported, naming the reason, for adapters this path does
not handle (DoRA, embedding LoRA, modules_to_save, tied weights, keys it cannot map); the caller then merges in
memory with peft instead and records why. Nothing is written before the plan has passed.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from peft import LoraConfig
from peft.utils.other import get_pattern_key
from safetensors import safe_open

from lite_ft.errors import LiteFTError

# Files above this size are split, named and indexed as transformers does. It does not change the memory used (no
# shard is ever held in memory); 5 GiB is the Hub's customary size (transformers 5 itself writes up to 50 GB).
SHARD_BYTES = 5 * 1024**3
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8}
_FLOATS = ("F64", "F32", "F16", "BF16")  # cast to the output dtype, as model.to(dtype) does; other types are copied
_OUT_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# LoraConfig fields that change the merge beyond W + scaling * B @ A, or add weights beside A and B.
_UNSUPPORTED_OPTIONS = ("use_dora", "modules_to_save", "trainable_token_indices", "lora_bias", "target_parameters",
                        "layer_replication", "use_qalora", "alora_invocation_tokens", "velora_config",
                        "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "megatron_config")


class StreamingUnsupported(Exception):
    """This adapter or base needs the in-memory peft merge; the message says why."""


@dataclass(frozen=True)
class Delta:
    """The LoRA pair of one base weight and its factor: W' = W + scaling * (B @ A), transposed for fan_in_fan_out."""

    a_key: str
    b_key: str
    scaling: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class Plan:
    """What to read: every base tensor (file, safetensors dtype, shape), and the LoRA deltas by base key."""

    base_dir: Path
    tensors: dict[str, tuple[Path, str, tuple[int, ...]]]
    adapter_file: Path
    deltas: dict[str, Delta]


def base_folder(base_path: str, revision: str | None = None) -> Path:
    """The local folder holding the base's config.json and safetensors: the path itself, or for a Hub id the
    snapshot in the Hugging Face cache; StreamingUnsupported when the weights are not on disk as safetensors."""
    folder = Path(base_path).expanduser()
    if not folder.is_dir():
        found = try_to_load_from_cache(base_path, "config.json", revision=revision)
        if not isinstance(found, str):
            raise StreamingUnsupported(f"the base {base_path} is not a local folder nor in the Hugging Face cache")
        folder = Path(found).parent
    if not (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").is_file():
        raise StreamingUnsupported(f"the base {base_path} has no model.safetensors (or index) to read")
    return folder


def make_plan(base_path: str, adapter_dir: Path, revision: str | None = None) -> Plan:
    """Check that the adapter can be streamed into the base and say what to read; StreamingUnsupported if not,
    LiteFTError when the adapter's shapes do not fit the base (it was trained on another model)."""
    if sys.byteorder != "little":  # safetensors stores little-endian; tensors are written as they are in memory
        raise StreamingUnsupported("this machine is big-endian")
    folder = base_folder(base_path, revision)
    config = _lora_config(adapter_dir)
    tensors = _base_tensors(folder)
    adapter_file = adapter_dir / "adapter_model.safetensors"
    with safe_open(str(adapter_file), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    pairs = _lora_pairs(shapes)
    targets = _map_modules(pairs, tensors)
    _check_tied(folder, targets.values(), tensors)
    deltas = {}
    for module, key in targets.items():
        a_key, b_key = pairs[module]
        rank, alpha = _rank_alpha(config, module)
        if len(shapes[a_key]) != 2 or shapes[a_key][0] != rank or shapes[b_key][1] != rank:
            raise StreamingUnsupported(f"{a_key} has shape {list(shapes[a_key])}, not rank {rank} of adapter_config")
        product = (shapes[b_key][0], shapes[a_key][1])
        if (product[::-1] if config.fan_in_fan_out else product) != tensors[key][2]:
            raise LiteFTError(f"adapter {adapter_dir} does not fit the base model: its LoRA for {module} makes a "
                              f"{list(product)} update but the base's {key} is {list(tensors[key][2])}; point "
                              "model.source in the run's recipe.yaml at the model it was trained on")
        scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank  # as peft's LoraLayer
        deltas[key] = Delta(a_key, b_key, scaling, bool(config.fan_in_fan_out))
    return Plan(folder, tensors, adapter_file, deltas)


def _lora_config(adapter_dir: Path) -> Any:
    """peft's own reading of adapter_config.json (defaults of this peft version filled in), checked for options
    that change the merge."""
    raw = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if raw.get("peft_type") != "LORA":
        raise StreamingUnsupported(f"the adapter is {raw.get('peft_type')}, not LoRA")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    used = [name for name in _UNSUPPORTED_OPTIONS if getattr(config, name, None)]
    if config.bias != "none":
        used.append(f"bias={config.bias!r}")
    if config.init_lora_weights not in (True, False, "gaussian"):  # PiSSA, OLoRA, LoftQ ... change the base too
        used.append(f"init_lora_weights={config.init_lora_weights!r}")
    if used:
        raise StreamingUnsupported(f"adapter_config.json uses {', '.join(used)}")
    return config


def _base_tensors(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Every tensor of the base's safetensors file(s), read from the headers only: key -> (file, dtype, shape)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    else:
        files = ["model.safetensors"]
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:  # e.g. a Hub snapshot cached in part
        raise StreamingUnsupported(f"the base's {missing[0]} is not in {folder}")
    tensors = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                piece = f.get_slice(key)
                tensors[key] = (folder / name, piece.get_dtype(), tuple(piece.get_shape()))
    unknown = sorted({dtype for _, dtype, _ in tensors.values() if dtype not in _ITEMSIZE})
    if unknown:
        raise StreamingUnsupported(f"the base holds tensors of type {', '.join(unknown)}")
    return tensors


def _lora_pairs(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, str]]:
    """module name -> (lora_A key, lora_B key); StreamingUnsupported for any other tensor in the adapter file."""
    found: dict[str, dict[str, str]] = {}
    others = []
    for key in shapes:
        match = _LORA_KEY.match(key)
        if match is None:
            others.append(key)
        else:
            found.setdefault(match["module"], {})[match["ab"]] = key
    if others:  # the most telling first: peft saves a full copy of an embedding it adapted, beside its LoRA
        kinds = [("lora_embedding_", "embedding LoRA"), ("lora_magnitude_vector", "DoRA"),
                 (".base_layer.", "a full base weight saved with the adapter"), ("", "not a LoRA A/B weight")]
        part, why = next((part, why) for part, why in kinds if any(part in key for key in others))
        raise StreamingUnsupported(f"the adapter holds {next(k for k in others if part in k)} ({why})")
    lonely = [m for m, ab in found.items() if len(ab) != 2]
    if lonely:
        raise StreamingUnsupported(f"the adapter holds only one of lora_A/lora_B for {lonely[0]}")
    return {module: (ab["A"], ab["B"]) for module, ab in found.items()}


def _map_modules(pairs: dict[str, tuple[str, str]], tensors: dict[str, Any]) -> dict[str, str]:
    """module -> base weight key. The adapter names modules as they sit in the loaded model (`model.layers.0...`
    for a causal LM); a base saved as the bare backbone lacks the first part (BertModel under `bert.`). One rule
    for the whole adapter, so no module can be matched to a different layer by a second guess."""
    rules = (lambda m: f"{m}.weight", lambda m: f"{m.split('.', 1)[-1]}.weight")
    for rule in rules:
        mapped = {module: rule(module) for module in pairs}
        if all(key in tensors for key in mapped.values()):
            return mapped
    missing = next(m for m in pairs if rules[0](m) not in tensors)
    raise StreamingUnsupported(f"no weight for the adapter's module {missing} in the base's safetensors files")


def _check_tied(folder: Path, targets: Any, tensors: dict[str, Any]) -> None:
    """An adapter on a weight that config.json ties (lm_head = embed_tokens) changes both in peft's merge; the
    files hold one of them, so leave that to peft. The candidates have one row per token (embeddings, heads)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))  # absent: transformers' default
    vocab = config.get("vocab_size", text.get("vocab_size"))
    for key in targets:
        if tied and (vocab is None or tensors[key][2][0] == vocab):
            raise StreamingUnsupported(f"the adapter changes {key}, which may be tied to the embeddings "
                                       "(tie_word_embeddings)")


def _rank_alpha(config: Any, module: str) -> tuple[int, float]:
    """The rank and alpha peft gives `module`: rank_pattern / alpha_pattern matched as peft matches them."""
    rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return int(rank), float(alpha)


@dataclass(frozen=True)
class _Entry:
    key: str
    code: str  # safetensors dtype of the output
    shape: tuple[int, ...]
    nbytes: int


def _layout(plan: Plan, dtype: str, max_shard_bytes: int) -> list[tuple[str, list[_Entry]]]:
    """Output shards (file name, tensors in order): a new shard when the next tensor would pass max_shard_bytes."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for key, (_, code, shape) in plan.tensors.items():
        out = _OUT_CODE[dtype] if code in _FLOATS else code
        entry = _Entry(key, out, shape, math.prod(shape) * _ITEMSIZE[out])
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    n = len(shards)
    return [(f"model-{i:05d}-of-{n:05d}.safetensors", entries) for i, entries in enumerate(shards, 1)]


def _header(entries: list[_Entry]) -> bytes:
    """The safetensors header: u64 length, then JSON with each tensor's dtype, shape and byte range, padded with
    spaces to a multiple of 8 so the data that follows is aligned."""
    layout: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for e in entries:
        layout[e.key] = {"dtype": e.code, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(layout, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor from a safetensors file. The file is opened per tensor: safetensors maps the whole file, and
    pages read through a mapping that stays open count as resident until it closes."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key)


def merged_tensor(plan: Plan, key: str, dtype: str) -> torch.Tensor:
    """Base tensor `key`, with its LoRA update added in float32 when it has one, in the output dtype."""
    file, code, _ = plan.tensors[key]
    weight = read_tensor(file, key)
    delta = plan.deltas.get(key)
    if delta is not None:
        a = read_tensor(plan.adapter_file, delta.a_key).float()
        b = read_tensor(plan.adapter_file, delta.b_key).float()
        update = (b @ a).mul_(delta.scaling)  # in place: one float32 buffer of the weight's size, not three
        update = update.T if delta.fan_in_fan_out else update
        weight = update.add_(weight)  # = W + update as peft adds it (addition commutes, so bit for bit)
    return weight.to(getattr(torch, dtype)) if code in _FLOATS else weight


def _write_one(plan: Plan, entry: _Entry, dtype: str, f: Any) -> None:
    """Merge and append one tensor. A function of its own so that nothing of it is alive when the next is read."""
    tensor = merged_tensor(plan, entry.key, dtype).contiguous()
    data = tensor.reshape(-1).view(torch.uint8)
    if data.numel() != entry.nbytes or tuple(tensor.shape) != entry.shape:
        raise LiteFTError(f"{entry.key}: read {list(tensor.shape)} ({data.numel()} bytes), the header said "
                          f"{list(entry.shape)}; the base's safetensors file is inconsistent")
    f.write(data.numpy().data)


def write(plan: Plan, folder: Path, dtype: str, max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Write the merged weights into `folder` as model.safetensors, or shards and model.safetensors.index.json;
    return what was written (tensors, merged weights, files, bytes)."""
    shards = _layout(plan, dtype, SHARD_BYTES if max_shard_bytes is None else max_shard_bytes)
    for name, entries in shards:
        with open(folder / name, "wb") as f:
            f.write(_header(entries))
            for entry in entries:
                _write_one(plan, entry, dtype, f)
    total = sum(e.nbytes for _, entries in shards for e in entries)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {e.key: name for name, entries in shards for e in entries}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                              encoding="utf-8")
    return {"tensors": len(plan.tensors), "merged_weights": len(plan.deltas), "files": [n for n, _ in shards],
            "bytes": total}


def copy_config(plan: Plan, folder: Path, dtype: str) -> None:
    """config.json with the output dtype and without a quantization note (loaders would expect packed weights),
    and generation_config.json when the base has one."""
    config = json.loads((plan.base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    if "torch_dtype" in config:  # the name before transformers 5
        config["torch_dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if (plan.base_dir / "generation_config.json").is_file():
        shutil.copyfile(plan.base_dir / "generation_config.json", folder / "generation_config.json")


def plan_or_reason(base_path: str, adapter_dir: Path, revision: str | None, strategy: str) -> tuple[Plan | None,
                                                                                                   str | None]:
    """The streaming plan, or None and why not (the in-memory merge was asked for, or the adapter cannot be
    streamed). A fallback is announced: the in-memory merge needs about twice the model's memory."""
    if strategy == "in-memory":
        return None, "the in-memory merge was requested"
    try:
        return make_plan(base_path, adapter_dir, revision), None
    except StreamingUnsupported as exc:
        print(f"lite-ft: merging in memory (about twice the model's size), not tensor by tensor: {exc}",
              file=sys.stderr, flush=True)
        return None, str(exc)
