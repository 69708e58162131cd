"""Instruction tuning: (instruction, input) or chat messages -> response, with the chat template when the tokenizer
has one. Loss on the final response only. Scores: eval loss and perplexity over the response tokens."""
from __future__ import annotations

from typing import Any

import torch

from lite_ft.recipe.schema import DataConfig, Recipe
from lite_ft.data.batching import collate
from lite_ft.data.load import Split, field_value, text_cap
from lite_ft.data.tasks.causal import conversation_ids, encode_pair, example_losses, loss_scores


class InstructionTask:
    name = "instruction"
    causal = True
    fields_hint = "data.fields: {instruction: instruction, input: input, output: output} or {messages: messages}"

    def prepare(self, rows: list[Any], cfg: DataConfig, split: str) -> Split:
        out = Split(split, [])
        for i, row in enumerate(rows):
            if out.skip_bad(row):
                continue
            example = _from_messages(field_value(row, cfg, "messages", "messages"))
            if example is None:
                instruction = field_value(row, cfg, "instruction", "instruction")
                extra = field_value(row, cfg, "input", "input") or ""
                output = field_value(row, cfg, "output", "output")
                if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
                    out.skip("missing or wrong-typed field (instruction, output or messages)", row)
                    continue
                user = instruction.strip() + ("\n\n" + extra.strip() if extra.strip() else "")
                example = {"messages": [{"role": "user", "content": user}], "response": output.strip()}
            if not example["response"] or not example["messages"][-1]["content"]:
                out.skip("empty text", row)
                continue
            example["id"] = str(row.get("id", f"{split}-{i}"))
            out.examples.append(example)
        return out

    def encode(self, example: dict[str, Any], tokenizer: Any, recipe: Recipe) -> dict[str, Any] | None:
        messages = list(example["messages"])
        if recipe.data.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": recipe.data.system_prompt}] + messages
        cap = text_cap(tokenizer, recipe.data.max_length)
        if sum(len(m["content"]) for m in messages) > cap:
            return None  # the prompt alone is certainly over max_length (a prompt is never cut)
        response = example["response"]
        truncate = recipe.data.overlong == "truncate"
        if len(response) > cap and not truncate:
            return None
        prompt, target = conversation_ids(tokenizer, messages, response[:cap])
        encoded = encode_pair(prompt, target, recipe.data.max_length, truncate=truncate)
        if encoded is not None:
            encoded["truncated"] = len(prompt) + len(target) > recipe.data.max_length or len(response) > cap
        return encoded

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]], recipe: Recipe,
                 device: torch.device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        encoded = [(e, self.encode(e, tokenizer, recipe)) for e in examples]
        kept = [(e, enc) for e, enc in encoded if enc is not None]
        size = recipe.eval.batch_size
        batches = [collate([enc for _, enc in kept[s:s + size]], tokenizer.pad_token_id, causal=True)
                   for s in range(0, len(kept), size)]
        losses = example_losses(model, batches, device)
        records = [{"id": e["id"], "prediction": None, "response_tokens": sum(1 for t in enc["labels"][1:] if t >= 0),
                    "loss_sum": loss} for (e, enc), loss in zip(kept, losses)]
        return self.score(records, {}), records

    def eval_order(self, examples: list[dict[str, Any]], tokenizer: Any, recipe: Recipe) -> list[int]:
        """The examples that fit data.max_length, in their order (evaluate scores only those)."""
        return [i for i, e in enumerate(examples) if self.encode(e, tokenizer, recipe) is not None]

    def score(self, records: list[dict[str, Any]], shard_scores: dict[str, Any]) -> dict[str, Any]:
        """Loss and perplexity over every record's completion tokens, added up in the records' order."""
        scores = loss_scores([r["loss_sum"] for r in records], [r["response_tokens"] for r in records])
        return {**scores, "n": len(records)}


def _from_messages(messages: Any) -> dict[str, Any] | None:
    """A chat (list of {role, content}) ending with an assistant turn -> prompt messages + response."""
    if not isinstance(messages, list) or len(messages) < 2:
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return None
    if messages[-1].get("role") != "assistant":
        return None
    prompt = [{"role": str(m.get("role")), "content": m["content"]} for m in messages[:-1]]
    return {"messages": prompt, "response": messages[-1]["content"].strip()}
