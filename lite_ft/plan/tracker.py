"""Live tensor bytes over a forward and backward, counted op by op: the run is replayed on the `meta` device
(shapes only, no memory, no arithmetic), and every new storage an op returns is counted until it is freed.

The same counter runs on real tensors too, which is how tests check that the meta replay allocates what the real
computation does.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created by ops inside the block: `live` now, `peak` the most at once, and
    `small_at_peak`: how much of the peak was in storages under `threshold` bytes (glibc serves those from its
    heap, larger ones from their own mappings: lite_ft.allocator).

    Storages that existed before (weights, gradients, optimizer state) are registered with `known` and never
    counted: views of them (a transposed weight) are not new memory.
    """

    def __init__(self, known: Iterable[torch.Tensor] = (), threshold: int | None = None) -> None:
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self._refs: dict[int, Any] = {}
        self.live = 0
        self.peak = 0
        self.live_small = 0
        self.small_at_peak = 0
        self.threshold = threshold
        self.marks: dict[str, int] = {}
        for t in known:
            self._seen[t.untyped_storage()] = 0

    def _small(self, nbytes: int) -> bool:
        return self.threshold is None or nbytes < self.threshold

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        if self._small(nbytes):
            self.live_small -= nbytes
        self._refs.pop(key, None)

    def mark(self, name: str) -> None:
        """Remember the live bytes now under `name` (e.g. the end of the forward)."""
        self.marks[name] = self.live

    def reset_peak(self) -> None:
        self.peak = self.live
        self.small_at_peak = self.live_small

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[storage] = nbytes
            key = id(storage)
            # The callback runs when the storage is freed: its bytes leave the count then.
            self._refs[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._freed(key, n))
            self.live += nbytes
            if self._small(nbytes):
                self.live_small += nbytes
            if self.live > self.peak:
                self.peak, self.small_at_peak = self.live, self.live_small
        return out


@contextmanager
def cpu_attention_kernel() -> Iterator[None]:
    """Make scaled_dot_product_attention on meta tensors take the fused CPU kernel the real run takes (it saves
    the output and log-sum-exp, not the attention matrix); without this the meta device falls back to the math
    path, which keeps the full B x H x L x L weights."""
    original = F.scaled_dot_product_attention

    def fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
        if query.device.type != "meta" or dropout_p > 0:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            groups = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        return out[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
