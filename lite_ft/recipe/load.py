"""Recipes: YAML + command-line overrides, validated once into frozen typed objects (the schema is in schema.py).

Every problem in a recipe is collected and reported together (key, bad value, fix); unknown keys get a
"did you mean". Overrides (`train.lr=1e-4`) are merged into the raw document first, so the file and the command
line obey exactly the same rules.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lite_ft.errors import RecipeError
from lite_ft.recipe.preflight import check_environment
from lite_ft.recipe.schema import (
    DURING_SCORES,
    SECTIONS,
    DataConfig,
    EvalConfig,
    LoraSection,
    Method,
    ModelConfig,
    OutputConfig,
    Quantization,
    Recipe,
    Task,
    TrainConfig,
)

__all__ = ["DataConfig", "EvalConfig", "LoraSection", "Method", "ModelConfig", "OutputConfig", "Quantization",
           "Recipe", "SECTIONS", "Task", "TrainConfig", "apply_overrides", "dump_recipe", "load_recipe", "validate"]

# Names other fine-tuning tools use for our keys, so users coming from them get pointed to the right one.
_ALIASES = {"rank": "lora.r", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
            "learning_rate": "train.lr", "num_epochs": "train.epochs", "num_train_epochs": "train.epochs",
            "micro_batch_size": "train.batch_size", "per_device_train_batch_size": "train.batch_size",
            "gradient_accumulation_steps": "train.grad_accum", "max_seq_length": "data.max_length",
            "sequence_len": "data.max_length", "base_model": "model.source", "output_dir": "output.dir"}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def load_recipe(path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = (),
                document: dict[str, Any] | None = None, environment: bool = True) -> Recipe:
    """Read a recipe (a YAML file or an already parsed document), apply `section.key=value` overrides, validate.

    With `environment` (the default), the checks of this machine run too (data files exist, needed packages
    import; recipe.preflight): a saved recipe that is only read back, by merge or eval, skips them."""
    source = str(path) if path is not None else "recipe"
    if document is None:
        if path is None:
            raise RecipeError(["no recipe given: pass a YAML file"], source)
        document = _read_yaml(Path(path))
    problems: list[str] = []
    raw = apply_overrides(document, overrides, problems)
    recipe = validate(raw, problems, environment)
    if problems or recipe is None:
        raise RecipeError(problems, source)
    return recipe


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError([f"file not found: {path}. Pass the path of a recipe YAML (see recipes/)."], str(path))
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError([f"not valid YAML: {exc}"], str(path)) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise RecipeError([f"the top level must be a mapping of keys (task, method, model, ...), got "
                           f"{type(doc).__name__}"], str(path))
    return doc


def apply_overrides(document: dict[str, Any], overrides: typing.Iterable[str], problems: list[str]) -> dict[str, Any]:
    """Merge `a.b=value` strings into a copy of the document; values are parsed as YAML scalars."""
    raw: dict[str, Any] = copy.deepcopy(document)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: write it as section.key=value, e.g. train.lr=1e-4")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        target = raw
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        target[parts[-1]] = value
    return raw


def validate(raw: dict[str, Any], problems: list[str], environment: bool = True) -> Recipe | None:
    """Check a raw document against the schema (and, with `environment`, against this machine); append every
    problem found; return the recipe if none."""
    top_keys = {"task", "method", *SECTIONS}
    for key in raw:
        if key not in top_keys:
            problems.append(_unknown(str(key), top_keys))
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(Recipe)
    for key in ("task", "method"):
        choices = typing.get_args(hints[key])
        if key not in raw:
            problems.append(f"{key}: missing; set it to one of {', '.join(choices)}")
        elif _check(key, raw[key], hints[key], problems) in choices:
            values[key] = raw[key]
    for name, cls in SECTIONS.items():
        section = raw.get(name, {})
        if section is None:
            section = {}
        if not isinstance(section, dict):
            problems.append(f"{name}: expected a mapping of keys, got {section!r}")
            section = {}
        values[name] = _build_section(name, cls, section, problems)
    # Range and combination checks run on every value that passed its type check, so one report lists everything.
    recipe = Recipe(**{"task": "qa", "method": "lora", **values})
    _check_ranges(recipe, problems)
    _check_combinations(recipe, problems)
    if environment:
        check_environment(recipe, problems)
    return None if problems else _resolve(recipe)


def _build_section(name: str, cls: type, section: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known, candidates = set(hints), _all_keys()  # once per section, not per bad key (52,000 bad keys: 128 s -> 13 s)
    kwargs = {}
    for key, value in section.items():
        if key not in known:
            problems.append(_unknown(f"{name}.{key}", candidates))
            continue
        before = len(problems)
        converted = _check(f"{name}.{key}", _expand_env(value), hints[key], problems)
        if len(problems) == before:  # a bad value keeps the default, so later checks still run
            kwargs[key] = converted
    return cls(**kwargs)


def _all_keys() -> set[str]:
    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for s, cls in SECTIONS.items():  # the keys of nested mappings (train.early_stop.patience)
        keys |= {f"{s}.{name}.{f.name}" for name, hint in typing.get_type_hints(cls).items()
                 for arm in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(arm)
                 for f in dataclasses.fields(arm)}
    return keys


def _unknown(key: str, candidates: set[str]) -> str:
    section, _, leaf = key.rpartition(".")
    # A known key in the wrong section (train.r -> lora.r), else the closest spelling among the section's own keys
    # (compared by leaf name: the shared "train." prefix alone would make any key look close).
    guess = [c for c in sorted(candidates) if section and c.endswith("." + leaf)][:1]
    guess = guess or ([_ALIASES[leaf]] if leaf in _ALIASES else [])
    if not guess:
        own = {c.rpartition(".")[2]: c for c in candidates if c.rpartition(".")[0] == section}
        guess = [own[g] for g in difflib.get_close_matches(leaf, sorted(own), n=1, cutoff=0.6)]
    hint = f"did you mean {guess[0]}?" if guess else "remove it (see recipes/ for the keys a recipe takes)"
    return f"{key}: unknown key; {hint}"


def _expand_env(value: Any) -> Any:
    """Expand ${VAR} and ${VAR:-default} in strings, so recipes can point at data through the environment."""
    if not isinstance(value, str):
        return value
    return _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


def _check(key: str, value: Any, hint: Any, problems: list[str]) -> Any:
    """Return `value` converted to the type `hint`, or append a problem and return the value unchanged."""
    nested = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
    if nested and isinstance(value, dict):  # a mapping of its own keys, e.g. train.early_stop: {metric, patience}
        return _build_section(key, nested[0], value, problems)
    ok, converted = _convert(value, hint)
    if not ok:
        guess = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(hint)], n=1, cutoff=0.6) \
            if typing.get_origin(hint) is Literal else []
        fix = f"; did you mean {guess[0]}?" if guess else ""
        problems.append(f"{key}: {value!r} is not {_describe(hint)}{fix}")
    return converted


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return True, None
        for arm in typing.get_args(hint):
            if arm is not type(None):
                ok, converted = _convert(value, arm)
                if ok:
                    return True, converted
        return False, value
    if origin is Literal:
        return (value in typing.get_args(hint)), value
    if origin is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True, list(value)
        return False, value
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return True, dict(value)
        return False, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return True, float(value)
            except OverflowError:  # an integer beyond the float range
                return False, value
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str) and value != "", value
    return False, value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(hint))
    if origin is list:
        return "a list of strings"
    if origin is dict:
        return "a mapping of strings to strings"
    if dataclasses.is_dataclass(hint):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string",
             type(None): "null"}
    return names.get(hint, str(hint))


# Upper limits a real run can reach, with room to spare; past them a value is a typo (an extra digit or two), and
# would fail much later, after the model has loaded, with an allocation error.
MAX_TOKENS = 2**21  # 2M: twice the longest context of current open models (1M)
MAX_BATCH = 2**16  # examples in one micro-batch or one step's accumulation: far past what fits any accelerator
MAX_STEPS = 10**8  # a hundred million optimizer steps: years of training at one step per second
MAX_EPOCHS = 10**4
MAX_EXAMPLES = 10**10  # more rows than any public fine-tuning set has
MAX_RANK = 2**14  # LoRA rank: 16k is past the hidden size of the largest open models


def _check_ranges(r: Recipe, problems: list[str]) -> None:
    t, d = r.train, r.data
    rules: list[tuple[str, Any, bool, str]] = [
        ("lora.r", r.lora.r, 1 <= r.lora.r <= MAX_RANK, f"use a rank from 1 to {MAX_RANK}, commonly 8 or 16"),
        ("lora.alpha", r.lora.alpha, r.lora.alpha > 0, "use a positive number, commonly 2 * r"),
        ("lora.dropout", r.lora.dropout, 0 <= r.lora.dropout < 1, "use a value in [0, 1), e.g. 0.05"),
        ("train.lr", t.lr, 0 < t.lr < 1, "use a learning rate such as 2e-4 (LoRA) or 2e-5 (full)"),
        ("train.batch_size", t.batch_size, 1 <= t.batch_size <= MAX_BATCH, f"use 1 to {MAX_BATCH}"),
        ("train.grad_accum", t.grad_accum, 1 <= t.grad_accum <= MAX_BATCH, f"use 1 to {MAX_BATCH}"),
        ("train.epochs", t.epochs, 0 < t.epochs <= MAX_EPOCHS,
         f"use a positive number of passes, at most {MAX_EPOCHS}"),
        ("train.max_steps", t.max_steps, t.max_steps is None or 1 <= t.max_steps <= MAX_STEPS,
         f"use 1 to {MAX_STEPS:,}, or leave it unset to train for train.epochs"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, "use 0 or more"),
        ("train.warmup_ratio", t.warmup_ratio, 0 <= t.warmup_ratio < 1, "use a value in [0, 1)"),
        ("train.max_grad_norm", t.max_grad_norm, t.max_grad_norm >= 0, "use 0 (off) or more"),
        ("train.log_every", t.log_every, 1 <= t.log_every <= MAX_STEPS, "use 1 or more"),
        ("train.save_every", t.save_every, 0 <= t.save_every <= MAX_STEPS, "use 0 (only on Ctrl-C or SIGTERM) or more"),
        ("train.keep_checkpoints", t.keep_checkpoints, 1 <= t.keep_checkpoints <= 10**6, "use 1 or more"),
        ("train.skip_nonfinite", t.skip_nonfinite, t.skip_nonfinite >= 0, "use 0 or more"),
        ("data.max_length", d.max_length, 16 <= d.max_length <= MAX_TOKENS, f"use 16 to {MAX_TOKENS:,} tokens"),
        *[(f"data.{k}", v, v is None or 1 <= v <= MAX_EXAMPLES, "use 1 or more, or leave it unset")
          for k, v in (("limit_train", d.limit_train), ("holdout", d.holdout), ("limit_eval", d.limit_eval))],
        ("eval.batch_size", r.eval.batch_size, 1 <= r.eval.batch_size <= MAX_BATCH, f"use 1 to {MAX_BATCH}"),
        ("eval.max_new_tokens", r.eval.max_new_tokens, 1 <= r.eval.max_new_tokens <= MAX_TOKENS,
         f"use 1 to {MAX_TOKENS:,}"),
        ("eval.every", r.eval.every, 0 <= r.eval.every <= MAX_STEPS, "use 0 (only the final evaluation) or more"),
        ("eval.during_limit", r.eval.during_limit, r.eval.during_limit is None or 1 <= r.eval.during_limit
         <= MAX_EXAMPLES, "use 1 or more, or leave it unset (the eval loss only)"),
        *([("train.early_stop.patience", t.early_stop.patience, 1 <= t.early_stop.patience <= MAX_STEPS,
            "use 1 or more evaluations")] if t.early_stop else []),
    ]
    for key, value, ok, fix in rules:
        if not ok:
            problems.append(f"{key}: {value!r} is out of range; {fix}")


def _check_combinations(r: Recipe, problems: list[str]) -> None:
    q = r.model.quantization
    if r.method == "full" and q not in (None, "none"):
        problems.append(f"model.quantization: {q!r} cannot be trained with method full (quantized weights have no "
                        "gradients); use method lora or qlora, or set model.quantization none")
    if r.method == "qlora" and q not in (None, "4bit"):
        problems.append(f"model.quantization: {q!r} contradicts method qlora (a 4-bit base); set it to 4bit, or use "
                        "method lora for LoRA on an 8-bit or unquantized base")
    if r.data.holdout and r.data.eval:
        problems.append("data.holdout: set together with data.eval; keep one of them (holdout splits data.train)")
    if r.task != "classification" and r.data.labels:
        problems.append(f"data.labels: only used by task classification; remove it for task {r.task}")
    _check_tracking(r, problems)


def _check_tracking(r: Recipe, problems: list[str]) -> None:
    """train.keep_best and train.early_stop need evaluations during training, eval data, and a known metric."""
    scores = DURING_SCORES[r.task]
    if r.eval.during_limit and not scores:
        problems.append(f"eval.during_limit: task {r.task}'s scores are its eval loss (eval.every logs it); remove it")
    has_eval = bool(r.data.eval or r.data.holdout) or not (r.data.train.startswith("builtin:") or
                                                           Path(r.data.train).suffix)  # a Hub id: its eval split
    stop = r.train.early_stop.metric if r.train.early_stop else None
    for key, where, metric in (("train.keep_best",) * 2 + (r.train.keep_best,),
                               ("train.early_stop.metric", "train.early_stop", stop)):
        if metric is None:
            continue
        if not r.eval.every:
            problems.append(f"{where}: needs evaluations during training; set eval.every (e.g. eval.every=20)")
        if not has_eval:
            problems.append(f"{where}: needs eval data; set data.eval or data.holdout")
        if metric not in ("eval_loss", *scores):
            problems.append(f"{key}: {metric!r} is not a metric of task {r.task}; use one of "
                            + ", ".join(("eval_loss", *scores)))
        elif metric != "eval_loss" and not r.eval.during_limit:
            problems.append(f"{key}: {metric} is a task score; set eval.during_limit (e.g. 100) so that it is "
                            "computed at each evaluation, or use eval_loss")


def _resolve(r: Recipe) -> Recipe:
    """Fill the defaults that depend on other keys, so the saved recipe states exactly what ran."""
    quant = r.model.quantization or ("4bit" if r.method == "qlora" else "none")
    return dataclasses.replace(r, model=dataclasses.replace(r.model, quantization=quant))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, loadable again with load_recipe."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, allow_unicode=True)
