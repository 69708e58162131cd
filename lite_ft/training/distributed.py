"""Processes: one, or N under torch.distributed (torchrun, `accelerate launch`, `lite-ft run --nproc N`), through
accelerate. Everything the rest of lite-ft needs to know about them is here: this process's rank, whether it
writes, the device it owns, and the few collectives the loop and evaluation use.

One process (the default) needs none of it: no process group, no accelerate state, the same code path with
collectives that return their input.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from lite_ft.errors import LiteFTError
from lite_ft.training import sharding

# How long a rank waits in a collective for the others before it fails: a rank that died (SIGKILL, out of memory)
# must not leave the rest hanging forever. Longer than any single step or evaluation batch should take.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
_closed_backend = ""  # the backend of a process group this process joined and left (Dist.close)
_joins = 0  # process groups joined again after close(): each under its own store prefix


def launched_world() -> int:
    """The number of processes a launcher (torchrun, accelerate launch, lite-ft --nproc) started: WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Dist:
    """This process's place among the run's processes. `accelerator` is None on one process."""

    rank: int = 0
    world: int = 1
    accelerator: Any = None
    fsdp: bool = False
    wrapped: Any = None  # the objective as wrapped (DDP, FSDP2), once the loop has built it

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder, the logs, the checkpoints and the progress bar."""
        return self.rank == 0

    def wrap(self, objective: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
        """DDP (or FSDP2 with `fsdp`) around the objective on N processes; the objective itself on one."""
        if self.world > 1:
            objective = sharding.shard(objective, model) if self.fsdp else \
                self.accelerator.prepare_model(objective, device_placement=False)
        self.wrapped = objective
        return objective

    @contextmanager
    def no_sync(self, module: torch.nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce (reduce-scatter under FSDP) for accumulation micro-batches; the last one of
        a step syncs."""
        if self.world == 1 or sync:
            if self.fsdp and self.world > 1:
                sharding.no_sync(module, True)
            yield
        elif self.fsdp:
            sharding.no_sync(module, False)
            yield
        else:
            with self.accelerator.no_sync(module):
                yield

    def unsharded(self) -> AbstractContextManager[Any]:
        """For calling the inner model directly (evaluation, generation) under FSDP."""
        return sharding.unsharded(self.wrapped) if self.fsdp and self.wrapped is not None else nullcontext()

    def sum(self, value: float | int) -> float:
        """The sum of `value` over all ranks (float64 on the CPU: exact for token counts)."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        torch.distributed.all_reduce(t)
        return t.item()

    def max(self, value: int) -> int:
        """The largest `value` over all ranks (e.g. a stop signal one of them received)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def gather(self, value: Any) -> list[Any]:
        """`value` from every rank, in rank order (any picklable object)."""
        if self.world == 1:
            return [value]
        found: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(found, value)
        return found

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _collective_device(self) -> torch.device:
        return self.accelerator.device if self.accelerator.device.type == "cuda" else torch.device("cpu")

    @contextmanager
    def lost_ranks_as_errors(self) -> Iterator[None]:
        """On N processes, a collective that fails because another rank died (its connection closed, a timeout)
        becomes a message that says so, instead of a traceback next to the failing rank's own message."""
        try:
            yield
        except (RuntimeError, torch.distributed.DistError) as exc:
            text = str(exc)
            if self.world == 1 or not any(w in text for w in ("Connection", "connection", "gloo", "NCCL", "nccl",
                                                                  "Timed out", "timed out", "closed")):
                raise
            first = text.strip().splitlines()[0][:200]
            raise LiteFTError(f"rank {self.rank}: lost contact with another rank ({first}); that rank's own "
                              "message says why") from None

    def close(self) -> None:
        """Leave the process group once every rank has finished (a no-op on one process). Without it gloo's
        worker threads outlive the interpreter's shutdown and a rank of a run that succeeded can abort at exit
        (SIGABRT, "terminate called without an active exception"), failing the whole launch. Only after success:
        after a failure the other ranks may never reach the barrier."""
        global _closed_backend
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            # Give gloo's worker threads the GIL to free the last collectives' tensors (Python-owned: they need
            # it). Whatever drops the group's last reference later (DDP's reducer, when the model goes) joins
            # those threads while holding the GIL; a thread still freeing a tensor then waits for it forever
            # (seen once in the suite: a rank hung in ~ProcessGroupGloo after a run that succeeded). 0.5 s, once
            # a run; a margin for a loaded 2-core machine, not a guarantee.
            time.sleep(0.5)
            _closed_backend = torch.distributed.get_backend()
            self.accelerator.end_training()

    def describe(self) -> dict[str, Any]:
        backend = torch.distributed.get_backend() if self.world > 1 else None
        return {"world_size": self.world, "rank": self.rank, "backend": backend}


def start(device_choice: str = "auto", fsdp: bool = False) -> Dist:
    """Join the process group a launcher set up (gloo on CPUs, nccl on GPUs, chosen by accelerate); on one
    process return a Dist that needs nothing."""
    fsdp = fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"  # accelerate launch's FSDP config
    if launched_world() == 1:
        if fsdp:
            raise LiteFTError("train.fsdp shards the model across processes, but this is one process; launch "
                              "several (lite-ft run --nproc N, torchrun or accelerate launch) or set train.fsdp false")
        return Dist()
    cpu = device_choice == "cpu" or not torch.cuda.is_available()  # accelerate uses gloo only when told: CPU
    if _closed_backend and not torch.distributed.is_initialized():
        # A second run in this process (Python API) after close(): accelerate keeps its state from the first and
        # would not join again, so join the same way it did, under a key prefix of its own: the launcher's store
        # still holds the first group's keys, and a rank reading another's old address fails to connect.
        global _joins
        _joins += 1
        store, rank, world = next(torch.distributed.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
        torch.distributed.init_process_group(_closed_backend, store=torch.distributed.PrefixStore(
            f"lite-ft-join-{_joins}", store), rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    accelerator = Accelerator(cpu=cpu, mixed_precision="no",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    if accelerator.num_processes != launched_world():  # never train N independent copies by mistake
        raise LiteFTError(f"WORLD_SIZE is {launched_world()} but accelerate set up {accelerator.num_processes} "
                          "process(es); launch with torchrun, accelerate launch or lite-ft run --nproc N")
    return Dist(rank=accelerator.process_index, world=accelerator.num_processes, accelerator=accelerator, fsdp=fsdp)
