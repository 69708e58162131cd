"""A finished run folder read back: its recipe, its weights (checked complete), its base model, and the model as
it was trained (base, quantized or not, plus adapter). Used by merge and eval; works from any directory."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from lite_ft.errors import LiteFTError
from lite_ft.model import load_base
from lite_ft.recipe.load import load_recipe
from lite_ft.sources.resolve import resolve_source

CPU = torch.device("cpu")


@dataclass
class RunInfo:
    """What a run folder holds, checked: its recipe, method, weights folder, resolved base and metrics."""

    folder: Path
    recipe: Any
    weights: Path  # adapter/ (lora, qlora) or model/ (full)
    is_adapter: bool
    base_path: str
    metrics: dict[str, Any]
    num_labels: int | None


def inspect_run(run_dir: str | os.PathLike[str]) -> RunInfo:
    """Read and check a run folder written by `lite-ft run`; LiteFTError naming what is missing or damaged."""
    folder = Path(run_dir).expanduser()
    if not (folder / "recipe.yaml").is_file():
        raise LiteFTError(f"{folder} is not a run folder (no recipe.yaml); pass the output.dir of a `lite-ft run`")
    recipe = load_recipe(folder / "recipe.yaml", environment=False)  # its data may be elsewhere by now
    is_adapter = recipe.method in ("lora", "qlora")
    weights = folder / ("adapter" if is_adapter else "model")
    _check_weights_folder(weights, is_adapter)
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    base_path = resolve_source(recipe.model.source, recipe.model.allow_pickle) if is_adapter else str(weights)
    return RunInfo(folder, recipe, weights, is_adapter, base_path, metrics, _num_labels(recipe, weights, metrics))


def _check_weights_folder(weights: Path, is_adapter: bool) -> None:
    """Every file the weights need exists and every safetensors file reads completely (a truncated copy fails)."""
    needed = ["adapter_config.json", "adapter_model.safetensors"] if is_adapter else ["config.json"]
    missing = [n for n in needed if not (weights / n).is_file()]
    files = sorted(weights.glob("*.safetensors")) if weights.is_dir() else []
    if not is_adapter and not files:
        missing.append("model.safetensors")
    if missing:
        raise LiteFTError(f"{weights} lacks {', '.join(missing)}; the run did not save its weights (output.save_model "
                          "false, or it was interrupted) or files were removed. Re-run training, or restore them")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)  # reads every byte: a truncated file fails here, not halfway through a merge
        except Exception as exc:  # safetensors raises its own error type, OSError or ValueError
            raise LiteFTError(f"{path} is damaged ({exc}); restore it from a copy or re-run training") from None


def _num_labels(recipe: Any, weights: Path, metrics: dict[str, Any]) -> int | None:
    """Classes of a classification run: from metrics.json, else data.labels, else None (the model default)."""
    if recipe.task != "classification":
        return None
    if metrics.get("eval", {}).get("num_labels"):
        return int(metrics["eval"]["num_labels"])
    return len(recipe.data.labels) if recipe.data.labels else None


def load_trained(run: RunInfo, quantized: bool, pad_token_id: int | None) -> torch.nn.Module:
    """The model as trained, on the CPU in float32: base (quantized as in training, or not) + adapter; or model/."""
    if not run.is_adapter:
        return load_plain(run.weights, run)
    recipe = run.recipe
    quant = recipe.model.quantization if quantized else "none"
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, quantization=quant))
    base = load_base(run.base_path, recipe, CPU, torch.float32, run.num_labels, pad_token_id)
    return attach_adapter(base, run)


def attach_adapter(base: torch.nn.Module, run: RunInfo) -> torch.nn.Module:
    """The run's adapter on `base`; every adapter tensor must land in the model (a different base fails)."""
    where = f"adapter {run.weights} does not fit the base model {run.recipe.model.source}"
    try:
        model = PeftModel.from_pretrained(base, str(run.weights), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()
        raise LiteFTError(f"{where} ({first[0] if first else type(exc).__name__} ...); it was trained on another "
                          "model: point model.source in the run's recipe.yaml at that model") from None
    with safe_open(str(run.weights / "adapter_model.safetensors"), framework="pt") as f:
        saved = sum(1 for k in f.keys() if "lora_" in k)
    loaded = sum(1 for k in model.state_dict() if "lora_" in k)
    if saved != loaded:  # e.g. a base with more or fewer layers: peft loads what matches and leaves the rest at 0
        raise LiteFTError(f"{where}: the adapter holds {saved} LoRA tensors but the model has {loaded} LoRA slots; "
                          "point model.source in the run's recipe.yaml at the model it was trained on")
    return model.eval()


def load_plain(folder: Path, run: RunInfo) -> torch.nn.Module:
    """A plain transformers folder in float32 (the check that the export needs neither lite-ft nor peft)."""
    cls = AutoModelForSequenceClassification if run.recipe.task == "classification" else AutoModelForCausalLM
    return cls.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True).eval()
