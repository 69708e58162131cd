"""What an export proves about itself: the prompts it was checked on and the comparison of its logits (or, for full
runs, its tensors) with the model as trained. A failed check fails the export."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lite_ft.data.load import load_splits
from lite_ft.data.tasks import get_task
from lite_ft.errors import LiteFTError

# Pass/fail bound on max |logit difference| between the export and the model as trained, as a fraction of the
# logit scale (max |reference logit|, at least 1). float32 differs only in summation order (W + sBA vs Wx + sB(Ax)):
# ~1e-6 of the scale, so 1e-3 is loose. float16 rounds each weight to 11 significant bits (2^-11 relative) and
# bfloat16 to 8 bits (2^-8); the errors add up over layers and a 50k-token head, measured on SmolLM2-135M at
# 0.2% (fp16) and 1.8% (bf16) of the scale. The bounds leave a margin of 5-10x over that.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}
_FALLBACK_PROMPTS = ["The capital of France is", "Question: What colour is a clear daytime sky?\nAnswer:",
                     "Once upon a time, in a small village by the sea,", "def add(a, b):\n    return"]
MAX_TOKENS = 256  # per verification prompt: enough context to exercise attention, bounded cost on a CPU


def verification_inputs(recipe: Any, tokenizer: Any, n: int) -> tuple[list[list[int]], str]:
    """Token ids of the first `n` eval examples (prompt and reference answer, as the task encodes them), or of
    fixed texts when the run's data cannot be read here (a Hub dataset offline); and where they came from."""
    task = get_task(recipe.task)
    try:
        train, evals = load_splits(recipe, task)
    except LiteFTError as exc:
        ids = [tokenizer(t)["input_ids"][:MAX_TOKENS] for t in _FALLBACK_PROMPTS[:n]]
        return ids, f"fixed texts (the run's data could not be read: {str(exc).splitlines()[0]})"
    split, name = (evals, "eval") if evals is not None else (train, "train")
    inputs = []
    for example in split.examples:
        if recipe.task == "classification":
            ids = tokenizer(example["text"], truncation=True, max_length=recipe.data.max_length)["input_ids"]
        else:
            encoded = task.encode(example, tokenizer, recipe)
            ids = encoded["input_ids"] if encoded else None
        if ids:  # the end of a causal example holds the answer, where the adapter matters most
            inputs.append(list(ids)[:MAX_TOKENS] if recipe.task == "classification" else list(ids)[-MAX_TOKENS:])
        if len(inputs) == n:
            break
    return inputs, f"first {len(inputs)} {name} examples of the run's recipe ({getattr(recipe.data, name)})"


def compare(reference: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, Any]:
    """Max and mean |difference|, the logit scale, and how often the top-1 (greedy) token agrees."""
    diffs = [(r - g).abs() for r, g in zip(reference, got)]
    agree = sum(int((r.argmax(-1) == g.argmax(-1)).sum()) for r, g in zip(reference, got))
    positions = sum(r.shape[0] if r.dim() == 2 else 1 for r in reference)
    max_diff = max(float(d.max()) for d in diffs)
    scale = max(1.0, max(float(r.abs().max()) for r in reference))
    mean = float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs))
    return {"max_abs_diff": max_diff, "mean_abs_diff": mean,
            "logit_scale": scale, "relative_max_diff": max_diff / scale, "greedy_agreement": agree / positions,
            "positions": positions}


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits per input (one at a time: no padding to mask), the last 64 positions of causal LMs only so
    that the references stay small on a 50k vocabulary."""
    model.eval()
    out = []
    for ids in inputs:
        values = model(input_ids=torch.tensor([ids])).logits[0].float()
        out.append(values[-64:].clone() if values.dim() == 2 else values.clone())
    return out


def verify(refs: dict[str, list[torch.Tensor]], got: list[torch.Tensor], dtype: str, source: str, n: int
           ) -> dict[str, Any]:
    """Compare with each reference; fail on the unquantized one beyond TOLERANCE[dtype] x the logit scale."""
    figures = {f"against_{name}_base": compare(ref, got) for name, ref in refs.items()}
    check = figures["against_unquantized_base"]
    bound = TOLERANCE[dtype] * check["logit_scale"]
    result = {"prompts": n, "prompt_source": source, "tolerance_relative": TOLERANCE[dtype], "bound": bound,
              "passed": check["max_abs_diff"] <= bound, **figures}
    if "against_quantized_base" in figures:
        result["note"] = ("pass/fail uses the adapter on the unquantized base; the quantized-base figures include the "
                          "quantization error of training and are reported only")
    if not result["passed"]:
        raise LiteFTError(f"merge verification failed: max |logit difference| {check['max_abs_diff']:.4g} exceeds "
                          f"{bound:.4g} ({TOLERANCE[dtype]:g} x logit scale {check['logit_scale']:.3g}) for {dtype}; "
                          "nothing was written. Try --dtype float32, or check that the base model is the one the "
                          "adapter was trained on")
    return result


def compare_weights(source: Path, export: Path) -> dict[str, Any]:
    """Full runs: tensor by tensor, the export against model/; LiteFTError when the dtype is unchanged and the
    tensors are not bit-identical (a conversion that should have been a copy)."""
    worst, same, same_dtype, count = 0.0, True, True, 0
    exported: dict[str, Path] = {}
    for path in sorted(export.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            exported.update({k: path for k in f.keys()})
    for path in sorted(source.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in (k for k in f.keys() if k in exported):  # a tied copy may be saved only once
                a = f.get_tensor(key)
                with safe_open(str(exported[key]), framework="pt") as g:
                    b = g.get_tensor(key)
                same_dtype = same_dtype and a.dtype == b.dtype
                same = same and a.dtype == b.dtype and torch.equal(a, b)
                worst = max(worst, float((a.float() - b.float()).abs().max())) if a.numel() else worst
                count += 1
    if same_dtype and not same:
        raise LiteFTError(f"the export differs from {source} although the dtype is unchanged (max |difference| "
                          f"{worst:.3g}); nothing was written")
    return {"tensors": count, "bit_identical": same, "max_abs_diff": worst}
