"""Small helpers shared by the unit and integration tests (plain functions, imported as `helpers`)."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "lite_ft" / "assets"


def cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """`python -m lite_ft ARGS` in a child process (one thread, this checkout on PYTHONPATH), stderr captured."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen([sys.executable, "-m", "lite_ft", *args], cwd=cwd, env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_steps(out: Path) -> int:
    """Steps logged so far in out/train_log.jsonl (0 before the file exists)."""
    log = out / "train_log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line; a str row is written verbatim (for malformed-line tests)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def tensor_digest(t: torch.Tensor) -> str:
    """A hash of a tensor's raw bytes: bit-exact, and NaN bit patterns (packed 4-bit storage) compare equal."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest() + str(tuple(t.shape)) + str(t.dtype)


def snapshot(model: torch.nn.Module) -> dict[str, str]:
    """Digest of every parameter and buffer, plus the 4-bit quantization state and the 8-bit scales, by name."""
    out = {name: tensor_digest(t) for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    try:
        import bitsandbytes as bnb
    except ImportError:
        return out
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            for key, value in module.weight.quant_state.as_dict(packed=True).items():
                if isinstance(value, torch.Tensor):
                    out[f"{name}.weight.{key}"] = tensor_digest(value)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            # The row scales live on the weight until the first forward pass, then on the module's state.
            scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
            out[f"{name}.SCB"] = tensor_digest(scb)
    return out


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    assert before.keys() == after.keys(), "the set of parameters changed"
    return sorted(name for name in before if before[name] != after[name])


def train_steps(model: torch.nn.Module, tokenizer: Any, recipe: Any, task_name: str | None = None,
                log_path: Path | None = None, monitor: Any = None, precision: Any = None
                ) -> tuple[dict[str, Any], list[float]]:
    """Load the recipe's data, encode it, run lite_ft.training.loop.train; return its stats and the per-log-step losses.

    `monitor`: a MemoryMonitor the caller has entered; by default a fresh one. `precision`: by default the
    recipe's policy on the model's device."""
    from lite_ft.data.load import load_splits
    from lite_ft.data.tasks import get_task
    from lite_ft.recipe.precision import precision_for
    from lite_ft.training.loop import train
    from lite_ft.training.memory import MemoryMonitor

    task = get_task(task_name or recipe.task)
    split, _ = load_splits(recipe, task)
    encoded = [e for e in (task.encode(x, tokenizer, recipe) for x in split.examples) if e is not None]
    assert encoded, "no example fits in data.max_length"
    device = next(model.parameters()).device
    own = monitor is None
    monitor = monitor or MemoryMonitor(device)
    with monitor if own else contextlib.nullcontext():
        stats = train(model, encoded, recipe.train, pad_id=tokenizer.pad_token_id, causal=task.causal,
                      precision=precision or precision_for(recipe, device), monitor=monitor, log_path=log_path)
    losses = []
    if log_path is not None:
        losses = [json.loads(line)["loss"] for line in log_path.read_text().splitlines()]
    return stats, losses


INSTRUCTION_ROWS = [
    {"instruction": "Name the colour of a clear daytime sky.", "input": "", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"},
    {"messages": [{"role": "user", "content": "What is two plus two?"},
                  {"role": "assistant", "content": "Four."}]},
    {"instruction": "Give the opposite word.", "input": "hot", "output": "cold"},
    {"instruction": "Summarise in one word: the river flooded the town.", "output": "flood"},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of Peru?"},
                  {"role": "assistant", "content": "Lima."}]},
]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` merged into a copy of `base`, section by section."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def recipe_doc(task: str, method: str, folder: Path, llama_dir: Path, bert_dir: Path, **sections: Any
               ) -> dict[str, Any]:
    """A small recipe document on the tiny models, writing into folder/run.

    qa: builtin:qa-train/qa-eval (8 train, 4 eval) on the tiny Llama; classification: the built-in sentiment sets
    (16/16) on the tiny BERT; instruction: INSTRUCTION_ROWS written into `folder`. `sections` merge in key by key.
    """
    doc: dict[str, Any] = {
        "task": task, "method": method,
        # fp32 pinned, not left to auto: the tests compare against fp32 references on any machine
        "model": {"source": str(llama_dir), "dtype": "float32"},
        "data": {"train": "builtin:qa-train", "eval": "builtin:qa-eval", "limit_train": 8, "limit_eval": 4,
                 "max_length": 512},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        # memory_check off: planning adds ~1 s to every run; tests/plan/ covers the check itself
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0, "log_every": 1, "seed": 0,
                  "memory_check": False},
        "eval": {"baseline": False, "batch_size": 4, "max_new_tokens": 4},
        "output": {"dir": str(folder / "run")},
    }
    if task == "classification":
        doc["model"]["source"] = str(bert_dir)
        doc["data"] = {"train": "builtin:sentiment-train", "eval": "builtin:sentiment-eval", "limit_train": 16,
                       "limit_eval": 16, "labels": ["negative", "positive"], "max_length": 64}
    elif task == "instruction":
        path = write_jsonl(folder / "instructions.jsonl", INSTRUCTION_ROWS)
        doc["data"] = {"train": str(path), "eval": str(path), "max_length": 128}
    return merge(doc, sections)


def save_tiny_llama(folder: Path, tokenizer: Any, hidden: int, layers: int = 2, tied: bool = True) -> Path:
    """A random (seeded) Llama of `layers` layers sized to `tokenizer`, saved with it into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=tied)
    torch.manual_seed(4321)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
