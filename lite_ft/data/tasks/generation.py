"""Batched greedy decoding for the qa and instruction evals, with shared prompt prefixes computed once.

Questions on one passage share everything up to the question (system prompt, instruction, the passage: about 90%
of a SQuAD prompt). A batch is cut into runs of prompts with a long common prefix; each run's prefix goes through
the model once, its keys and values are copied to the run's rows, and only the rest of each prompt is computed per
row. Prefill is where an eval's time goes on a CPU (it is compute-bound; a decode step costs a few ms per row), so
this is what makes the QA eval fast. The answers are those of decoding each prompt on its own: the cached keys and
values of a prefix are what each row would compute for it (up to float rounding), and positions count real tokens.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from lite_ft.data.tasks.causal import stop_ids

SHARE_AT_LEAST = 0.5
"""Prompts join a run when their common prefix is at least this share of the shorter one: questions on one passage
do (~0.9); prompts that only share a system prompt and instruction (~0.2) do not, as sharing would save little."""


@dataclass(frozen=True)
class Run:
    """Rows `start:end` of a batch, whose first `shared` tokens are equal and computed once."""
    start: int
    end: int
    shared: int


LENGTH_BUCKET = 32
"""Tokens: prompts are ordered by length in steps of this, then by their tokens. Questions on one passage stay
together (their lengths differ by the question's), and a batch's shared prefixes need little padding (on 200
SQuAD questions: 23.2k tokens through the model, against 25.1k without buckets and 49.6k without sharing)."""


def eval_order(prompts: list[list[int]]) -> list[int]:
    """The order in which `generate` batches prompts: by length bucket, then by token ids, so that prompts that
    begin alike sit together. A total order on the prompts, so a shard made of whole batches is batched exactly as
    in one process."""
    return sorted(range(len(prompts)), key=lambda i: (len(prompts[i]) // LENGTH_BUCKET, prompts[i], i))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def runs_of(batch: list[list[int]]) -> list[Run]:
    """Cut a batch (in eval_order) into runs sharing a long prefix (a prompt alone is a run of one). At least the
    last token of every prompt is left out of the shared part: the first reply token is read from it, and the
    second pass, padded to its longest row, stays short (the questions, or one token)."""
    runs: list[Run] = []
    start, shared = 0, len(batch[0]) - 1
    for row in range(1, len(batch)):
        common = min(shared, common_prefix(batch[start], batch[row]), len(batch[row]) - 1)
        if common >= SHARE_AT_LEAST * min(len(batch[start]), len(batch[row])):
            shared = common
            continue
        runs.append(Run(start, row, shared))
        start, shared = row, len(batch[row]) - 1
    runs.append(Run(start, len(batch), shared))
    return runs


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


class Decoder:
    """One model's forward passes with an explicit cache, positions and mask (names differ across transformers 5
    releases: `cache` since 5.24, `past_key_values` before)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(type(inner).forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keep_last = "logits_to_keep" in params

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Last-position logits of `ids` appended to `cache`; `mask` covers cached and new positions."""
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # real tokens only are counted
        # the last position as an index, not the int 1: transformers slices an int into a strided view, for which
        # PyTorch's CPU linear in bf16 copies the output layer's weight once per row (1.35 GB for SmolLM2 and 25 rows)
        kwargs = {"logits_to_keep": torch.tensor([ids.shape[1] - 1], device=self.device)} if self.keep_last else {}
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True, **{self.cache_arg: cache}, **kwargs)
        found = getattr(out, "cache", None)
        return out.logits[:, -1].float(), found if found is not None else out.past_key_values

    def prefill(self, batch: list[list[int]], pad: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Logits after each prompt, the cache and the mask: shared prefixes once per run, then the rest per row."""
        runs = runs_of(batch)
        if all(r.end - r.start == 1 for r in runs):  # nothing shared: one pass, as plain left-padded prompts
            runs = [Run(row, row + 1, 0) for row in range(len(batch))]
        cache, mask = None, torch.zeros((len(batch), 0), dtype=torch.long)
        if any(r.shared for r in runs):
            prefix_ids, prefix_mask = _left_padded([batch[r.start][:r.shared] for r in runs], pad)
            _, cache = self.forward(prefix_ids, prefix_mask, None)
            row_run = torch.tensor([k for k, r in enumerate(runs) for _ in range(r.start, r.end)])
            cache.reorder_cache(row_run.to(self.device))  # each run's keys and values, copied to its rows
            mask = prefix_mask[row_run]
        rest_ids, rest_mask = _left_padded([batch[row][r.shared:] for r in runs for row in range(r.start, r.end)],
                                           pad)
        mask = torch.cat([mask, rest_mask], dim=1)
        logits, cache = self.forward(rest_ids, mask, cache)
        return logits, cache, mask


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
             batch_size: int, device: torch.device, progress: Any = None) -> list[str]:
    """Greedy replies to `prompts`, batched in eval_order; a batch stops as soon as every row has ended."""
    model.eval()
    decoder, stops = Decoder(model, device), stop_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops or [0])[0]
    order = eval_order(prompts)
    replies: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        for i, tokens in zip(idx, _decode(decoder, [prompts[i] for i in idx], max_new_tokens, stops, pad)):
            replies[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if progress is not None:
            progress.update(len(idx))
    return replies


def _decode(decoder: Decoder, batch: list[list[int]], max_new_tokens: int, stops: list[int], pad: int
            ) -> list[list[int]]:
    """Each row's reply tokens, up to (not including) its stop token."""
    logits, cache, mask = decoder.prefill(batch, pad)
    stop_set = torch.tensor(stops, dtype=torch.long)
    ended = torch.zeros(len(batch), dtype=torch.bool)
    replies: list[list[int]] = [[] for _ in batch]
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1).cpu()
        newly = torch.isin(token, stop_set) & ~ended
        for row in torch.nonzero(~ended & ~newly).flatten().tolist():
            replies[row].append(int(token[row]))
        ended |= newly
        if bool(ended.all()) or step == max_new_tokens - 1:
            break  # no forward pass for a token nobody will read
        token = torch.where(ended, torch.tensor(pad), token)
        mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long)], dim=1)
        logits, cache = decoder.forward(token[:, None], mask, cache)
    return replies
