"""Causal-LM pieces shared by the qa and instruction tasks: prompt encoding, batched greedy generation, eval loss."""
from __future__ import annotations

import math
from typing import Any

import torch

IGNORE = -100  # label value that the loss skips (prompt and padding positions)


def chat_messages(user: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt ending where the assistant's reply begins: the chat template when the tokenizer has
    one, else the plain text of the messages followed by "Answer:"."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    text = "\n\n".join(m["content"] for m in messages) + "\nAnswer:"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids)


def completion_ids(tokenizer: Any, text: str) -> list[int]:
    """The reply's tokens followed by the end-of-sequence token, so the model learns to stop."""
    ids = tokenizer(text if getattr(tokenizer, "chat_template", None) else " " + text,
                    add_special_tokens=False)["input_ids"]
    return list(ids) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def encode_pair(prompt: list[int], completion: list[int], max_length: int, truncate: bool = False
                ) -> dict[str, list[int]] | None:
    """input_ids and labels with the loss on the completion only. An example over max_length is None, or with
    `truncate` its completion is cut to fit (never the prompt: a cut prompt loses the question)."""
    if len(prompt) + len(completion) > max_length:
        if not truncate or len(prompt) >= max_length:
            return None
        completion = completion[: max_length - len(prompt)]
    return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int,
             batch_size: int, device: torch.device, progress: Any = None) -> list[str]:
    """Greedy decoding with a KV cache, prompts batched by length and left-padded; returns the decoded replies."""
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
        if progress is not None:
            progress.update(len(idx))
    return replies


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Mean token loss over the completion tokens and its perplexity."""
    from lite_ft.loss import causal_lm_loss

    model.eval()
    total = tokens = 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, n = causal_lm_loss(model, batch)
        total += loss.item() * n
        tokens += n
    mean = total / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": int(tokens)}
