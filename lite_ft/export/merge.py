"""`lite-ft merge`: fold a run's LoRA adapter into its base model (or convert a full run's weights), check the result
against the model as it was trained, and write an ordinary transformers folder or a GGUF file with export.json and a
model card.

Nothing appears at the output folder until every check has passed: the export is built in a hidden sibling folder
and renamed into place at the end; on any failure that folder is removed.
"""
from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lite_ft.errors import LiteFTError
from lite_ft.export import gguf_export, streaming
from lite_ft.export.record import write_record
from lite_ft.export.run_folder import CPU, RunInfo, inspect_run, load_plain, load_trained
from lite_ft.export.verify import compare_weights, logits, verification_inputs, verify
from lite_ft.model import load_tokenizer
from lite_ft.training.memory import MemoryMonitor

DTYPES = ("float32", "float16", "bfloat16")
FORMATS = ("safetensors", "gguf")
STRATEGIES = ("streaming", "in-memory")


def merge(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], dtype: str = "float32",
          fmt: str = "safetensors", gguf_type: str = "f16", prompts: int = 4,
          strategy: str = "streaming") -> dict[str, Any]:
    """Merge the run's adapter into its base (full runs: convert model/), verify, export to `out`; return the
    export record (also written to out/export.json). A previous export at `out` is replaced atomically.

    strategy "streaming" (LoRA/QLoRA runs exported as safetensors) merges tensor by tensor from the base's files,
    falling back to the in-memory peft merge, with the reason recorded, for adapters it does not handle;
    "in-memory" always loads the whole base and merges with peft."""
    _check_choices(dtype, fmt, gguf_type, strategy)
    run = inspect_run(run_dir)
    target = Path(out).expanduser()
    replaced = _check_out(target, run.folder)
    tokenizer = load_tokenizer(str(run.weights), run.recipe)
    prepared = gguf_export.prepare(run, tokenizer, gguf_type) if fmt == "gguf" else {}  # before anything is written
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    monitor = MemoryMonitor(CPU)
    before = monitor.current_mib()  # libraries already loaded: the merge's own cost is the peak minus this
    try:
        staging.mkdir()
        with monitor:
            record = _export(run, staging, tokenizer, dtype, fmt, gguf_type, prompts, monitor, strategy, prepared)
        phases = {k: round(v["peak_mib"], 1) for k, v in monitor.phases.items()}
        # The merge step alone (in memory: loading, merging and saving); the whole peak includes verification,
        # which loads the adapter model and the export, one after the other.
        merge_peak = max((phases[p] for p in ("merge", "save") if p in phases), default=None)
        record.update(peak_rss_mib=round(monitor.report()["peak_mib"], 1), rss_before_mib=round(before, 1),
                      merge_peak_rss_mib=merge_peak, memory_phases=phases,
                      replaced_previous_export=replaced)
        write_record(staging, record, run)
        _commit(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _check_choices(dtype: str, fmt: str, gguf_type: str, strategy: str) -> None:

    for name, value, choices in (("dtype", dtype, DTYPES), ("format", fmt, FORMATS),
                                 ("gguf type", gguf_type, gguf_export.GGUF_TYPES), ("strategy", strategy, STRATEGIES)):
        if value not in choices:
            raise LiteFTError(f"{name} {value!r} is not one of {', '.join(choices)}")


def _check_out(out: Path, run_folder: Path) -> bool:
    """Refuse an output that would destroy the run or someone's files; True when it holds an export to replace."""
    resolved, run = out.resolve(), run_folder.resolve()
    if resolved == run or resolved in run.parents:
        raise LiteFTError(f"--out {out} holds the run itself; choose a folder outside {run_folder}")
    if out.is_file():
        raise LiteFTError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "export.json").is_file():
            raise LiteFTError(f"--out {out} already holds files that are not a lite-ft export; choose a new or empty "
                              "folder (a previous lite-ft export there is replaced)")
        return True
    return False


def _export(run: RunInfo, staging: Path, tokenizer: Any, dtype: str, fmt: str, gguf_type: str, prompts: int,
            monitor: Any, strategy: str, prepared: dict[str, Any]) -> dict[str, Any]:
    """Reference logits, merge, write, reload, compare. Returns the record without the run's own facts."""
    inputs = verification_inputs(run.recipe, tokenizer, prompts)
    if fmt == "gguf":
        return gguf_export.export(run, staging, tokenizer, gguf_type, prepared, inputs, monitor, strategy,
                                  lambda ids: _quantized_reference(run, tokenizer, ids, monitor))
    plan, why = _streaming_plan(run, fmt, strategy)
    if plan is not None:
        return _export_streaming(run, plan, staging, tokenizer, dtype, inputs, monitor)
    refs = _quantized_reference(run, tokenizer, inputs[0], monitor)
    record = _export_in_memory(run, staging, tokenizer, dtype, fmt, gguf_type, inputs, refs, monitor)
    if why:
        record["merge_strategy"] += f"; not streamed: {why}"
    return record


def _quantized_reference(run: RunInfo, tokenizer: Any, ids: list[list[int]], monitor: Any
                         ) -> dict[str, list[torch.Tensor]]:
    """Logits of the adapter on the 4/8-bit base it was trained with (QLoRA, LoRA on 8-bit); {} otherwise."""
    if not (run.is_adapter and run.recipe.model.quantization in ("4bit", "8bit")):
        return {}
    with monitor.phase("quantized_reference"):
        refs = {"quantized": logits(load_trained(run, True, tokenizer.pad_token_id), ids)}
    gc.collect()
    return refs


def _streaming_plan(run: RunInfo, fmt: str, strategy: str) -> tuple[Any, str | None]:
    """The streaming plan for a LoRA/QLoRA run exported as safetensors, or None and why not (None when streaming
    does not apply at all: full runs, GGUF). A fallback is announced: it needs about twice the model's memory."""
    if not run.is_adapter or fmt != "safetensors":
        return None, None
    return streaming.plan_or_reason(run.base_path, run.weights, run.recipe.model.revision, strategy)


def _export_streaming(run: RunInfo, plan: Any, staging: Path, tokenizer: Any, dtype: str,
                      inputs: tuple[list[list[int]], str], monitor: Any) -> dict[str, Any]:
    """Merge file to file (the `merge` phase holds about one tensor), then verify: the adapter on its quantized
    base if it was trained so, the adapter on its base and the export are loaded one after the other."""
    ids, prompt_source = inputs
    with monitor.phase("merge"):  # first, before any model has been loaded: nothing else inflates its peak
        written = streaming.write(plan, staging, dtype)
        streaming.copy_config(plan, staging, dtype)
        tokenizer.save_pretrained(staging)
    refs = _quantized_reference(run, tokenizer, ids, monitor)
    with monitor.phase("verify"):
        trained = load_trained(run, False, tokenizer.pad_token_id)
        refs["unquantized"] = logits(trained, ids)
        del trained
        gc.collect()
        reloaded = load_plain(staging, run)
        got = logits(reloaded, ids)
        del reloaded
    strategy = (f"streaming LoRA merge: the base's safetensors read tensor by tensor, W + scale * B @ A in float32 "
                f"for {written['merged_weights']} of {written['tensors']} tensors, written as {dtype} into "
                f"{len(written['files'])} file(s); the merge holds about one tensor, not the model")
    return {"format": "safetensors", "dtype": dtype, "merge_strategy": strategy, "streaming_merge": written,
            "verification": verify(refs, got, dtype, prompt_source, len(ids))}


def _export_in_memory(run: RunInfo, staging: Path, tokenizer: Any, dtype: str, fmt: str, gguf_type: str,
                      inputs: tuple[list[list[int]], str], refs: dict[str, list[torch.Tensor]],
                      monitor: Any) -> dict[str, Any]:
    """The whole base in float32 with peft's merge_and_unload (and every full run), saved as safetensors."""

    ids, prompt_source = inputs
    with monitor.phase("merge"):
        model = load_trained(run, False, tokenizer.pad_token_id)
        refs["unquantized"] = logits(model, ids)
        merged = model.merge_and_unload() if run.is_adapter else model
        del model
        _check_no_lora(merged)
    record: dict[str, Any] = {"format": fmt, "dtype": dtype, "merge_strategy": _strategy(run, fmt, dtype, gguf_type)}
    with monitor.phase("save"):
        _save(merged.to(getattr(torch, dtype)), tokenizer, staging)
        del merged
        gc.collect()
    with monitor.phase("verify"):
        reloaded = load_plain(staging, run)
        got = logits(reloaded, ids)
        del reloaded
    record["verification"] = verify(refs, got, dtype, prompt_source, len(ids))
    if not run.is_adapter:
        record["verification"]["weights"] = compare_weights(run.weights, staging)
    return record


def _strategy(run: RunInfo, fmt: str, dtype: str, gguf_type: str) -> str:
    target = dtype if fmt == "safetensors" else f"GGUF {gguf_type}"
    if not run.is_adapter:
        return f"full run: model/ loaded in float32 and written as {target}"
    return (f"peft merge_and_unload (W + scale * B @ A) into the base loaded unquantized in float32 on the CPU, "
            f"then written as {target}")


def _check_no_lora(model: torch.nn.Module) -> None:
    left = [n for n, _ in model.named_modules() if "lora_" in n]
    if left or hasattr(model, "peft_config"):
        raise LiteFTError(f"merging left LoRA modules in the model ({', '.join(left[:3])}); this adapter type cannot "
                          "be merged into plain weights")


def _save(model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
    """config.json, model.safetensors (shards for big models; written tensor by tensor), generation config,
    tokenizer. A quantization note inherited from training must not make loaders expect 4-bit weights."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _commit(staging: Path, out: Path) -> None:
    """Move the finished export into place. A previous export is moved aside first and removed after, so `out`
    holds either the old export or the new one, never a mixture."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{int(time.time())}"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
