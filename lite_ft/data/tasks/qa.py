"""Extractive reading comprehension with a causal LM: passage + question -> answer span, generated greedily.

Loss is on the answer tokens only. Scores: SQuAD v1.1 exact match and F1, max over the references.
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from lite_ft.recipe.schema import DataConfig, Recipe
from lite_ft.data.load import Split, field_value, text_cap
from lite_ft.metrics import qa_scores
from lite_ft.data.tasks.causal import chat_messages, conversation_ids, encode_pair, prompt_ids
from lite_ft.data.tasks.generation import eval_order, generate

INSTRUCTION = ("Read the passage and answer the question with a short phrase copied exactly from the passage.\n\n"
               "Passage: {context}\n\nQuestion: {question}")


class QATask:
    name = "qa"
    causal = True
    fields_hint = "data.fields: {context: context, question: question, answers: answers.text}"

    def prepare(self, rows: list[Any], cfg: DataConfig, split: str) -> Split:
        out = Split(split, [])
        for i, row in enumerate(rows):
            if out.skip_bad(row):
                continue
            context = field_value(row, cfg, "context", "context")
            question = field_value(row, cfg, "question", "question")
            answers = field_value(row, cfg, "answers", "answers.text")
            if isinstance(answers, str):
                answers = [answers]
            if not isinstance(context, str) or not isinstance(question, str) or not isinstance(answers, list):
                out.skip("missing or wrong-typed field (context, question, answers)", row)
                continue
            answers = [a for a in answers if isinstance(a, str) and a.strip()]
            if not context.strip() or not question.strip() or not answers:
                out.skip("empty text", row)
                continue
            if not any(a in context for a in answers):
                out.skip("answer not in context", row)
                continue
            row_id = row.get("id", f"{split}-{i}")
            out.examples.append({"id": str(row_id), "context": context, "question": question.strip(),
                                 "answers": answers})
        return out

    def messages(self, example: dict[str, Any], recipe: Recipe) -> list[dict[str, str]]:
        user = INSTRUCTION.format(context=example["context"].strip(), question=example["question"])
        return chat_messages(user, recipe.data.system_prompt)

    def prompt(self, example: dict[str, Any], tokenizer: Any, recipe: Recipe) -> list[int]:
        return prompt_ids(tokenizer, self.messages(example, recipe))

    def encode(self, example: dict[str, Any], tokenizer: Any, recipe: Recipe) -> dict[str, Any] | None:
        # Train on the first reference that is a span of the passage (SQuAD train rows have exactly one).
        if len(example["context"]) + len(example["question"]) > text_cap(tokenizer, recipe.data.max_length):
            return None  # certainly over max_length: skipped without tokenizing it
        answer = next(a for a in example["answers"] if a in example["context"])
        prompt, target = conversation_ids(tokenizer, self.messages(example, recipe), answer.strip())
        return encode_pair(prompt, target, recipe.data.max_length)

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]], recipe: Recipe,
                 device: torch.device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        prompts = [self.prompt(e, tokenizer, recipe) for e in examples]
        with tqdm(total=len(prompts), desc="eval (generate)", unit="q", leave=False) as bar:
            replies = generate(model, tokenizer, prompts, recipe.eval.max_new_tokens, recipe.eval.batch_size,
                               device, progress=bar)
        replies = [r.split("\n")[0].strip() for r in replies]  # an answer is one line
        records = [{"id": e["id"], "prediction": r, "references": e["answers"]} for e, r in zip(examples, replies)]
        return self.score(records, {}), records

    def eval_order(self, examples: list[dict[str, Any]], tokenizer: Any, recipe: Recipe) -> list[int]:
        """As generate batches them: prompts that begin alike (questions on one passage) together."""
        return eval_order([self.prompt(e, tokenizer, recipe) for e in examples])

    def score(self, records: list[dict[str, Any]], shard_scores: dict[str, Any]) -> dict[str, Any]:
        return qa_scores([r["prediction"] for r in records], [r["references"] for r in records])
