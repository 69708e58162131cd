"""FSDP2 (`train.fsdp: true`): parameters, gradients and optimizer state sharded across the processes, for a model
whose full fine-tune does not fit one device. Each decoder layer is one shard group and the Objective (model +
loss) the root, so that the fast loss path, which calls the decoder and the output layer separately, still runs
inside the root's forward.

Checkpoints and the saved weights hold full tensors, gathered through torch.distributed.checkpoint's state-dict
API: they load on any number of processes, with or without FSDP.
"""
from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard

from lite_ft.errors import LiteFTError

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on the CPU of rank 0
TRAINABLE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
LOAD = StateDictOptions(full_state_dict=True)  # every rank passes the full tensors it read; each keeps its shard


def layer_classes(model: torch.nn.Module) -> set[str]:
    """The transformer block classes of a transformers model (its `_no_split_modules`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise LiteFTError(f"train.fsdp: {type(base).__name__} does not name its transformer blocks "
                          "(_no_split_modules), so lite-ft cannot shard it layer by layer; set train.fsdp false")
    return names


def shard(objective: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """fully_shard every transformer block, then the objective as the root group. Returns the objective."""
    names = layer_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block)
    fully_shard(objective)
    return objective


def no_sync(objective: torch.nn.Module, sync: bool) -> Any:
    """FSDP's counterpart of DDP's no_sync: keep unsharded gradients local until the step's last micro-batch."""
    objective.set_requires_gradient_sync(sync)
    return objective


@contextmanager
def unsharded(objective: torch.nn.Module) -> Iterator[None]:
    """The root group's parameters gathered (embeddings, final norm, output layer), so that the inner model can be
    called directly, as generation does; the blocks gather their own in their forward. Every rank must then run
    the same forwards (FSDP's all-gathers are collectives): under FSDP each rank evaluates every example."""
    if not isinstance(objective, FSDPModule):
        yield
        return
    objective.unshard()
    try:
        yield
    finally:
        objective.reshard()


def full_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as full CPU tensors (a collective: every rank calls it; rank 0 gets them)."""
    return get_model_state_dict(model, options=TRAINABLE)


def full_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state with full tensors, keyed by parameter name (a collective, like full_trainable)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def full_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as full CPU tensors, for save_pretrained (a collective)."""
    return get_model_state_dict(model, options=FULL)


def load_full(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
              optimizer_state: dict[str, Any]) -> None:
    """Load a checkpoint's full trainable weights and optimizer state into the sharded model and optimizer."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=LOAD)


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full trainable weights (the kept best evaluation's) into the sharded model; every rank calls it."""
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
