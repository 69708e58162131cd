"""Where a run computes and in which dtypes: the device, and the precision policy (README, "Precision").

Resolved once, at the edge of a command, from the recipe and the hardware, then passed down: the model builder
stores weights as the policy says and the training loop computes as it says.

| method     | 16-bit dtype (bf16 / fp16)                                   | fp32                  |
| ---------- | ------------------------------------------------------------ | --------------------- |
| full       | fp32 master weights, gradients and AdamW state; forward and   | everything fp32       |
|            | backward under autocast in the 16-bit dtype                   |                       |
| lora       | frozen base stored in 16 bits; adapters, their gradients and  | everything fp32       |
|            | optimizer state fp32                                          |                       |
| qlora      | base NF4, dequantized to the 16-bit dtype for compute;        | NF4, computes fp32    |
|            | adapters fp32                                                 |                       |

fp16 always trains with a gradient scaler (dynamic loss scaling): its 5 exponent bits flush small gradients to 0.
bf16 has fp32's exponent range and needs none.
"""
from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from lite_ft.errors import LiteFTError
from lite_ft.recipe.schema import Recipe

HALF = (torch.bfloat16, torch.float16)


def pick_device(choice: str = "auto") -> torch.device:
    """cuda when asked or available, else cpu. Asking for cuda without one is an error, not a silent fallback."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise LiteFTError("train.device is cuda but no CUDA GPU is visible; set train.device auto or cpu")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (x86 AMX-BF16 or AVX512-BF16), as torch detects it. Measured on
    a 2-core Xeon with AMX: bf16 matmuls 2,330 GFLOP/s against 310 in fp32; on CPUs without either, ~400x slower."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9; before it, the private checks
    if capabilities is not None:
        found = capabilities()
        return bool(found.get("amx_bf16") or found.get("avx512_bf16"))
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 on CPUs. On CPUs that compute bf16 in hardware (cpu_computes_bf16) a
    recipe may ask for bfloat16: 1.5x the main job's tokens/s there, but it scored EM 63 against 67 in fp32
    (README, "Precision"), so it is not the default."""
    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def slow_dtype_note(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why a 16-bit dtype asked for on this CPU will be slow, or None (GPUs, fp32, CPUs with bf16 hardware)."""
    if device.type != "cpu" or dtype == torch.float32:
        return None
    if dtype == torch.bfloat16 and cpu_computes_bf16():
        return None
    name = str(dtype).replace("torch.", "")
    return (f"model.dtype {name} on a CPU without {'AMX / AVX512-BF16' if name == 'bfloat16' else 'fp16 hardware'}: "
            "its matmuls run up to ~400x slower than fp32 here; model.dtype float32 (or auto) is faster")


@dataclass(frozen=True)
class Precision:
    """The dtypes of one run: `compute` (activations, matmuls), `weights` (what the model is loaded in) and
    whether the forward runs under autocast and the backward through a gradient scaler."""

    device: torch.device
    compute: torch.dtype
    weights: torch.dtype
    autocast: bool
    grad_scaler: bool

    def autocast_context(self) -> AbstractContextManager[object]:
        """torch.autocast in the compute dtype where the policy asks for it, else nothing."""
        if not self.autocast:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.grad_scaler else None

    def describe(self) -> dict[str, object]:
        """For metrics.json: what was stored and computed in which dtype."""
        name = lambda d: str(d).replace("torch.", "")  # noqa: E731
        return {"compute": name(self.compute), "weights": name(self.weights), "autocast": self.autocast,
                "grad_scaler": self.grad_scaler}


def precision_for(recipe: Recipe, device: torch.device) -> Precision:
    """The policy of the module docstring for this recipe on this device."""
    compute = pick_dtype(recipe.model.dtype, device)
    half = compute in HALF
    full = recipe.method == "full"
    # Full fine-tuning keeps fp32 master weights and computes in 16 bits under autocast; LoRA stores the frozen
    # base in 16 bits (peft keeps the adapters in fp32) and needs no autocast.
    weights = torch.float32 if full else compute
    return Precision(device=device, compute=compute, weights=weights, autocast=full and half,
                     grad_scaler=compute == torch.float16)


@dataclass(frozen=True)
class Placement:
    """What a command resolves once about the hardware, before any model is loaded."""

    device: torch.device
    precision: Precision


def place(recipe: Recipe) -> Placement:
    """Resolve device and precision for `recipe` (LiteFTError when the device asked for is absent)."""
    device = pick_device(recipe.train.device)
    precision = precision_for(recipe, device)
    note = slow_dtype_note(precision.compute, device)
    if note:
        print(f"lite-ft: {note}", file=sys.stderr)
    return Placement(device=device, precision=precision)
