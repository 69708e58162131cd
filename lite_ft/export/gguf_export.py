"""`lite-ft merge --format gguf`: the merged model written as a GGUF file, checked in llama.cpp, with an Ollama
Modelfile beside it.

LoRA and QLoRA runs stream: the base's safetensors are read tensor by tensor, each adapted weight merged in float32
(streaming.merged_tensor) and appended to the GGUF before the next is read, so the write holds about one tensor.
The reference logits then come from the adapter on its base, merged in memory with peft (one model). Full runs and
adapters streaming does not handle are merged in memory and written from there. f32, f16 and q8_0 are written
here; q4_k_m, q5_k_m and q6_k by llama.cpp's own quantizer from an f16 file. With the `gguf-check` extra the file is
loaded in llama.cpp and checked (gguf_check); without it, it is read back with transformers and the record says
that it was not checked in llama.cpp.
"""
from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from lite_ft.data.tasks.causal import stop_ids
from lite_ft.errors import LiteFTError
from lite_ft.export import gguf, gguf_check, llama_cpp, ollama, streaming
from lite_ft.export.gguf_vocab import source_gguf
from lite_ft.export.run_folder import RunInfo, load_trained
from lite_ft.export.verify import logits, verify

GGUF_TYPES = (*gguf.WRITTEN_TYPES, *llama_cpp.QUANTIZER_TYPES)
NOT_CHECKED = f"not checked in llama.cpp (the gguf-check extra is not installed: {llama_cpp.INSTALL})"


def prepare(run: RunInfo, tokenizer: Any, gguf_type: str) -> dict[str, Any]:
    """Everything that can refuse the export, before anything is written: the model and tokenizer (with the
    pre-tokenizer name to write), and llama.cpp for the types only its quantizer makes."""
    config = AutoConfig.from_pretrained(run.base_path if run.is_adapter else str(run.weights),
                                        trust_remote_code=run.recipe.model.trust_remote_code)
    pre = gguf.check_supported(config, tokenizer, run.recipe.task, source_gguf(run.recipe))
    if gguf_type in llama_cpp.QUANTIZER_TYPES and llama_cpp.version() is None:
        raise LiteFTError(f"--gguf-type {gguf_type} is made by llama.cpp's quantizer, which is not installed; "
                          f"{llama_cpp.INSTALL}")
    return {"config": config, "pre": pre}


def _plan(run: RunInfo, strategy: str) -> tuple[Any, str | None]:
    """The streaming plan of a LoRA/QLoRA run, or None and why not."""
    if not run.is_adapter:
        return None, "a full run's weights are converted in memory"
    return streaming.plan_or_reason(run.base_path, run.weights, run.recipe.model.revision, strategy)


def _streamed(plan: Any) -> gguf.Tensors:
    return gguf.Tensors({k: shape for k, (_, _, shape) in plan.tensors.items()},
                        lambda key: streaming.merged_tensor(plan, key, "float32"))


def _in_memory(model: torch.nn.Module) -> gguf.Tensors:
    state = model.state_dict()
    return gguf.Tensors({k: tuple(v.shape) for k, v in state.items()}, lambda key: state[key])


def export(run: RunInfo, staging: Path, tokenizer: Any, gguf_type: str, prepared: dict[str, Any],
           inputs: tuple[list[list[int]], str], monitor: Any, strategy: str,
           quantized_reference: Callable[[list[list[int]]], dict[str, list[torch.Tensor]]]) -> dict[str, Any]:
    """Write staging/model.gguf and the Modelfile, verify; return the export record without the run's facts."""
    ids, prompt_source = inputs
    engine = llama_cpp.version()
    quantized = gguf_type in llama_cpp.QUANTIZER_TYPES
    first = staging / (".model-f16.gguf" if quantized else gguf.FILE)
    args = (prepared["config"], tokenizer, first, "f16" if quantized else gguf_type, run.folder.name, prepared["pre"])
    plan, why = _plan(run, strategy)
    if plan is not None:
        with monitor.phase("merge"):  # before any model is loaded, so that its peak is the write's own
            written = gguf.write(_streamed(plan), *args)
    refs = quantized_reference(ids)
    with monitor.phase("verify" if plan is not None else "merge"):
        model = load_trained(run, False, tokenizer.pad_token_id)
        refs["unquantized"] = logits(model, ids)
        merged = model.merge_and_unload() if run.is_adapter else model
        del model
        if hasattr(merged, "peft_config") or any("lora_" in n for n, _ in merged.named_modules()):
            raise LiteFTError("merging left LoRA modules in the model; this adapter cannot become plain weights")
        got = logits(merged, ids)
        prompts = gguf_check.eval_prompts(run.recipe, tokenizer, ids)
        ref = gguf_check.reference(merged, prompts, stop_ids(tokenizer)) if engine else None
        if plan is None:
            written = gguf.write(_in_memory(merged), *args)
        del merged
        gc.collect()
    record: dict[str, Any] = {"format": "gguf", "dtype": gguf_type, "merge_strategy": _strategy(plan, why, gguf_type),
                              "verification": verify(refs, got, "float32", prompt_source, len(ids))}
    if quantized:
        with monitor.phase("quantize"):
            written["quantized"] = llama_cpp.quantize(first, staging / gguf.FILE, gguf_type)
            first.unlink()
        written.update(file=gguf.FILE, type=gguf_type, bytes=(staging / gguf.FILE).stat().st_size)
    written["tensor_types"] = gguf.tensor_types(staging / gguf.FILE)
    text, written["modelfile"] = ollama.modelfile(tokenizer, gguf.FILE)
    (staging / ollama.FILE).write_text(text, encoding="utf-8")
    record["gguf"] = written
    if engine:
        with monitor.phase("llama_cpp"):
            written["llama_cpp"] = gguf_check.check(staging / gguf.FILE, tokenizer, gguf_type, ids, got, ref)
        written["checked_in"] = engine
        return record
    with monitor.phase("gguf_readback"):
        back = logits(gguf.load(staging), ids)
    written["roundtrip"] = gguf.check_roundtrip(got, back, gguf_type)
    written["checked_in"] = f"transformers only; {NOT_CHECKED}"
    return record


def _strategy(plan: Any, why: str | None, gguf_type: str) -> str:
    if plan is not None:
        return (f"streaming LoRA merge into GGUF: the base's safetensors read tensor by tensor, W + scale * B @ A in "
                f"float32 for {len(plan.deltas)} of {len(plan.tensors)} tensors, converted and appended one at a "
                f"time (the write holds about one tensor); reference logits from the adapter on its base merged "
                f"with peft" + (", then llama.cpp's quantizer for " + gguf_type
                                if gguf_type in llama_cpp.QUANTIZER_TYPES else ""))
    return (f"model loaded in float32 (adapter merged with peft merge_and_unload) and written as GGUF "
            f"{gguf_type}; not streamed: {why}")
