"""Text classification with a sequence-classification head (encoders such as MiniLM, or causal LMs).

Labels are class indices; names come from data.labels or from the data. Scores: accuracy and macro F1.
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from lite_ft.recipe.schema import DataConfig, Recipe
from lite_ft.data.batching import collate
from lite_ft.data.load import Split, field_value, text_cap
from lite_ft.metrics import classification_scores


class ClassificationTask:
    name = "classification"
    causal = False
    fields_hint = "data.fields: {text: sentence, label: label}"

    def __init__(self) -> None:
        self.label_names: list[str] | None = None  # set from data.labels or from string labels in the data

    def prepare(self, rows: list[Any], cfg: DataConfig, split: str) -> Split:
        out = Split(split, [])
        if cfg.labels:
            self.label_names = list(cfg.labels)
        elif self.label_names is None:  # string labels without data.labels: their sorted names, fixed by train
            found = {field_value(r, cfg, "label", "label") for r in rows if isinstance(r, dict)}
            strings = sorted(v for v in found if isinstance(v, str) and not v.strip().lstrip("-").isdigit())
            self.label_names = strings or None
        names = self.label_names
        for i, row in enumerate(rows):
            if out.skip_bad(row):
                continue
            text = field_value(row, cfg, "text", "text")
            if text is None and "text" not in cfg.fields:
                text = row.get("sentence")  # GLUE-style sentence columns need no mapping
            label = field_value(row, cfg, "label", "label")
            if not isinstance(text, str) or label is None or isinstance(label, bool):
                out.skip("missing or wrong-typed field (text, label)", row)
                continue
            if not text.strip():
                out.skip("empty text", row)
                continue
            index = _label_index(label, names)
            if index is None:
                out.skip("label outside the label set", row)
                continue
            out.examples.append({"id": str(row.get("id", row.get("idx", f"{split}-{i}"))), "text": text.strip(),
                                 "label": index})
        return out

    def num_labels(self, cfg: DataConfig, *splits: Split | None) -> int:
        if self.label_names:
            return len(self.label_names)
        seen = [e["label"] for s in splits if s is not None for e in s.examples]
        return max(2, max(seen) + 1) if seen else 2

    def encode(self, example: dict[str, Any], tokenizer: Any, recipe: Recipe) -> dict[str, Any] | None:
        cap = text_cap(tokenizer, recipe.data.max_length)
        text = example["text"][:cap]  # never tokenize more than max_length can hold
        ids = tokenizer(text)["input_ids"]
        cut = len(example["text"]) > cap or len(ids) > recipe.data.max_length
        if cut:
            if recipe.data.overlong == "skip":
                return None
            ids = tokenizer(text, truncation=True, max_length=recipe.data.max_length)["input_ids"]
        return {"input_ids": list(ids), "labels": example["label"], "truncated": cut}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]], recipe: Recipe,
                 device: torch.device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        model.eval()
        # Every eval example is scored: over-long ones are truncated here whatever data.overlong says.
        cap = text_cap(tokenizer, recipe.data.max_length)
        encoded = [{"input_ids": tokenizer(e["text"][:cap], truncation=True,
                                           max_length=recipe.data.max_length)["input_ids"],
                    "labels": e["label"]} for e in examples]
        preds: list[int] = []
        size = recipe.eval.batch_size
        for start in tqdm(range(0, len(encoded), size), desc="eval (classify)", unit="batch", leave=False):
            batch = collate(encoded[start:start + size], tokenizer.pad_token_id, causal=False)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            preds.extend(int(p) for p in logits.argmax(-1).tolist())
        records = [{"id": e["id"], "prediction": p, "label": e["label"]} for e, p in zip(examples, preds)]
        return self.score(records, {"num_labels": int(model.config.num_labels)}), records

    def eval_order(self, examples: list[dict[str, Any]], tokenizer: Any, recipe: Recipe) -> list[int]:
        return list(range(len(examples)))

    def score(self, records: list[dict[str, Any]], shard_scores: dict[str, Any]) -> dict[str, Any]:
        return classification_scores([r["prediction"] for r in records], [r["label"] for r in records],
                                     shard_scores["num_labels"])


def _label_index(label: Any, names: list[str] | None) -> int | None:
    """A label as a class index: an int in range, or a name found in `names`."""
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, int):
        return label if label >= 0 and (names is None or label < len(names)) else None
    if isinstance(label, str) and names is not None and label in names:
        return names.index(label)
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return _label_index(int(label), names)
    return None
