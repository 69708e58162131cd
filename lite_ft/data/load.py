"""Load raw records from the Hub, local files or the built-in sets, and map their columns to task fields.

Rows that a task cannot use are skipped and counted by reason; a run with no usable example stops here, before
any model is loaded.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import load_dataset

from lite_ft.errors import DataError, LiteFTError
from lite_ft.recipe.schema import DataConfig, Recipe
from lite_ft.sources.hub import require_hub

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = {
    "qa-train": "qa_train.jsonl", "qa-eval": "qa_eval.jsonl",
    "sentiment-train": "sentiment_train.jsonl", "sentiment-eval": "sentiment_eval.jsonl",
}
_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class BadRow:
    """A line of a data file that is not a usable JSON object; tasks count it under `reason`."""

    reason: str
    text: str


@dataclass
class Split:
    """Usable examples of one split (task fields only) and what was skipped, by reason."""

    name: str
    examples: list[dict[str, Any]]
    skipped: Counter = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)  # the first 3 offending rows per reason
    truncated: int = 0  # examples kept but cut to data.max_length (data.overlong truncate)

    def skip_bad(self, row: Any) -> bool:
        """Count `row` and return True if it is a BadRow (unreadable line)."""
        if isinstance(row, BadRow):
            self.skip(row.reason, row.text)
            return True
        return False

    def skip(self, reason: str, row: Any) -> None:
        self.skipped[reason] += 1
        shown = self.samples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(str(row)[:200])

    def report(self) -> dict[str, Any]:
        return {"used": len(self.examples), "skipped": dict(self.skipped), "truncated": self.truncated,
                "examples_of_skipped": self.samples}


def load_rows(source: str, split: str, what: str) -> list[dict[str, Any] | BadRow]:
    """Raw rows of a builtin:NAME set, a local file, or a Hub dataset id (one split); BadRow for unreadable lines."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN:
            raise DataError(f"{what}: unknown built-in dataset {name!r}; choose one of "
                            f"{', '.join('builtin:' + n for n in BUILTIN)}")
        return _load_local(ASSETS / BUILTIN[name], what)
    path = Path(source).expanduser()
    if path.suffix.lower() in _LOADERS or path.exists():
        if path.is_dir():
            raise DataError(f"{what}: {source} is a folder; give a data file in it (.jsonl, .json, .csv or "
                            ".parquet)")
        if not path.is_file():
            raise DataError(f"{what}: file {source} not found")
        return _load_local(path, what)
    return _load_hub(source, split, what)


def _load_local(path: Path, what: str) -> list[dict[str, Any] | BadRow]:
    loader = _LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(f"{what}: {path} has an unknown format; use .jsonl, .json, .csv or .parquet")
    if loader == "json" and path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, what)  # line by line, so one bad line is skipped instead of failing the file
    try:
        return list(load_dataset(loader, data_files=str(path), split="train"))
    except Exception as exc:  # datasets raises many types for malformed files
        raise DataError(f"{what}: cannot read {path}: {exc}") from None


def _read_jsonl(path: Path, what: str) -> list[dict[str, Any] | BadRow]:
    rows: list[dict[str, Any] | BadRow] = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                rows.append(BadRow("line not UTF-8 encoded", raw[:200].decode("utf-8", "replace")))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                rows.append(BadRow("malformed JSON line", line[:200]))
                continue
            rows.append(row if isinstance(row, dict) else BadRow("line is not a JSON object", line[:200]))
    return rows


def _load_hub(repo_id: str, split: str, what: str) -> list[dict[str, Any]]:
    require_hub(repo_id, "dataset", "built-in datasets work offline (builtin:qa-train, builtin:sentiment-train, "
                "...); local .jsonl/.csv/.parquet files too")
    try:
        return list(load_dataset(repo_id, split=split))
    except ValueError as exc:
        raise DataError(f"{what}: split {split!r} of {repo_id}: {exc}") from None
    except Exception as exc:
        raise LiteFTError(f"{what}: cannot load Hub dataset {repo_id}: {exc}") from None


def get_path(row: dict[str, Any], path: str) -> Any:
    """Follow a dotted column path (`answers.text`) into a row; None where it does not exist."""
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def text_cap(tokenizer: Any, max_length: int) -> int:
    """Characters that `max_length` tokens can cover at most: max_length x the longest token in the vocabulary.
    Text past it is cut before tokenizing, so that a 50 MB row costs no more than one that fits."""
    longest = getattr(tokenizer, "_lite_ft_longest_token", None)
    if longest is None:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        setattr(tokenizer, "_lite_ft_longest_token", longest)  # the vocabulary scan costs ~50 ms: once per tokenizer
    return max_length * max(longest, 1)


def fingerprint(split: Split, source: str) -> dict[str, Any]:
    """What the training examples were: a sha256 over the examples a run trains on (after field mapping and
    limits, so it catches edited texts and labels whatever the source), with the file's size and mtime when the
    source is a local file. A resume compares it with its checkpoint's."""
    digest = hashlib.sha256(json.dumps(split.examples, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    found: dict[str, Any] = {"source": source, "sha256": digest, "examples": len(split.examples)}
    path = Path(source).expanduser()
    if path.is_file():
        stat = path.stat()
        found.update(size=stat.st_size, mtime=stat.st_mtime)
    return found


def field_value(row: dict[str, Any], cfg: DataConfig, name: str, default: str) -> Any:
    """The value of task field `name`, read from the column that data.fields maps it to (default: same name)."""
    return get_path(row, cfg.fields.get(name, default))


def load_splits(recipe: Recipe, task: Any) -> tuple[Split, Split | None]:
    """Train and eval examples for `task` (from lite_ft.data.tasks), after limits; DataError when nothing is usable."""
    cfg: DataConfig = recipe.data
    train_rows = load_rows(cfg.train, cfg.train_split, "data.train")
    eval_source = cfg.eval or (cfg.train if _is_hub(cfg.train) and not cfg.holdout else None)
    eval_rows = load_rows(eval_source, cfg.eval_split, "data.eval") if eval_source else None
    if cfg.holdout:
        if cfg.holdout >= len(train_rows):
            raise DataError(f"data.holdout: {cfg.holdout} is not less than the {len(train_rows)} rows of data.train")
        order = list(range(len(train_rows)))
        random.Random(recipe.train.seed).shuffle(order)
        eval_rows = [train_rows[i] for i in order[: cfg.holdout]]
        train_rows = [train_rows[i] for i in order[cfg.holdout:]]
        eval_source = f"{cfg.train} (held out)"
    train = task.prepare(train_rows, cfg, "train")
    evals = task.prepare(eval_rows, cfg, "eval") if eval_rows is not None else None
    train.examples = train.examples[: cfg.limit_train] if cfg.limit_train else train.examples
    if evals is not None and cfg.limit_eval:
        evals.examples = evals.examples[: cfg.limit_eval]
    for split, source in ((train, cfg.train), (evals, eval_source)):
        if split is not None and not split.examples:
            reasons = ", ".join(f"{n} {r}" for r, n in split.skipped.items()) or "the source is empty"
            raise DataError(f"data.{split.name}: no usable example in {source} ({reasons}). "
                            f"Map the columns with data.fields, e.g. {task.fields_hint}")
    return train, evals


def _is_hub(source: str) -> bool:
    return not source.startswith("builtin:") and Path(source).suffix.lower() not in _LOADERS
