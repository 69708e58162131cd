"""Recipe schema: shipped recipes validate, every problem is reported at once with a fix, overrides obey the same
rules as the file, and nothing but a Recipe or a RecipeError ever comes out of load_recipe."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import REPO, write_jsonl
from lite_ft.recipe.load import SECTIONS, Recipe, dump_recipe, load_recipe
from lite_ft.errors import RecipeError

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def problems_of(document: dict[str, Any] | None = None, overrides: tuple[str, ...] = (),
                path: Path | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides, document=document)
    assert info.value.problems, "a RecipeError must list at least one problem"
    return info.value.problems


def only_problem(problems: list[str], key: str) -> str:
    hits = [p for p in problems if p.startswith(key + ":")]
    assert len(hits) == 1, f"expected one problem for {key}, got {problems}"
    return hits[0]


# --- shipped recipes ------------------------------------------------------------------------------------------

@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run from the repository root (recipes use paths relative to it); if ../shared/data is absent, point
    LITE_FT_DATA at a stand-in folder so file-based recipes still find their data."""
    monkeypatch.chdir(REPO)
    if not (REPO.parent / "shared" / "data" / "instructions.jsonl").is_file():
        write_jsonl(tmp_path / "instructions.jsonl", [{"instruction": "Say hi.", "output": "hi"}])
        monkeypatch.setenv("LITE_FT_DATA", str(tmp_path))


def test_recipes_are_shipped() -> None:
    assert len(RECIPES) >= 5, RECIPES
    assert {"qa-lora.yaml", "qa-qlora.yaml", "qa-full.yaml"} <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates_and_round_trips(path: Path, in_repo: None) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.model.quantization == ("4bit" if recipe.method == "qlora" else recipe.model.quantization)
    assert recipe.model.quantization in ("none", "8bit", "4bit")  # resolved: never left unset
    assert load_recipe(document=yaml.safe_load(dump_recipe(recipe))) == recipe


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_header_gives_its_run_command(path: Path) -> None:
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(f"lite-ft run recipes/{path.name}" in line for line in header), header


# --- unknown keys and "did you mean" --------------------------------------------------------------------------

@pytest.mark.parametrize("section, key, suggestion", [
    ("train", "lrr", "train.lr"),            # a typo in the right section
    ("train", "r", "lora.r"),                # a known key in the wrong section
    ("train", "batchsize", "train.batch_size"),
    ("data", "max_len", "data.max_length"),
    ("lora", "rank", "lora.r"),
    ("model", "quantisation", "model.quantization"),
])
def test_unknown_key_names_the_key_and_suggests(section: str, key: str, suggestion: str) -> None:
    problem = only_problem(problems_of({"task": "qa", "method": "lora", section: {key: 1}}), f"{section}.{key}")
    assert f"unknown key; did you mean {suggestion}?" in problem


def test_unknown_key_with_no_close_match_says_remove_it() -> None:
    problem = only_problem(problems_of({"task": "qa", "method": "lora", "zzzzzzzz": {"q": 1}}), "zzzzzzzz")
    assert "did you mean" not in problem and "remove it" in problem


def test_nonsense_key_in_a_section_gets_no_suggestion() -> None:
    problem = only_problem(problems_of({"task": "qa", "method": "lora", "train": {"qqqqqq": 1}}), "train.qqqqqq")
    assert "did you mean" not in problem and "remove it" in problem


def test_unknown_top_level_key_suggests_section() -> None:
    problem = only_problem(problems_of({"task": "qa", "method": "lora", "trian": {"lr": 1e-4}}), "trian")
    assert "did you mean train?" in problem


def test_bad_choice_suggests_the_closest_value() -> None:
    problems = problems_of({"task": "qa", "method": "qlorra"})
    assert "did you mean qlora?" in only_problem(problems, "method")


# --- every problem at once --------------------------------------------------------------------------------------

def test_all_problems_are_reported_in_one_error(tmp_path: Path) -> None:
    document = {
        "task": "summarize",                                  # not a task
        "method": "lora",
        "train": {"lrr": 1e-4, "batch_size": 0, "max_steps": "many", "lr": 5},   # unknown, range, type, range
        "lora": {"r": 0, "dropout": 1.5},
        "data": {"train": str(tmp_path / "missing.jsonl"), "max_length": 8},
        "eval": {"baseline": "yes"},
    }
    problems = problems_of(document)
    for key in ("task", "train.lrr", "train.batch_size", "train.max_steps", "train.lr", "lora.r", "lora.dropout",
                "data.train", "data.max_length", "eval.baseline"):
        only_problem(problems, key)
    assert len(problems) == 10, problems
    message = str(RecipeError(problems, "x.yaml"))
    assert message.startswith("x.yaml has 10 problems:") and all(p in message for p in problems)


def test_missing_task_and_method_are_both_reported() -> None:
    problems = problems_of({})
    assert "one of qa, classification, instruction" in only_problem(problems, "task")
    assert "one of full, lora, qlora" in only_problem(problems, "method")


def test_section_that_is_not_a_mapping() -> None:
    problem = only_problem(problems_of({"task": "qa", "method": "lora", "train": [1, 2]}), "train")
    assert "mapping" in problem


# --- overrides --------------------------------------------------------------------------------------------------

def test_overrides_are_applied_and_typed() -> None:
    recipe = load_recipe(document={"task": "qa", "method": "lora"},
                         overrides=["train.lr=1e-4", "train.max_steps=7", "lora.target_modules=[q_proj, v_proj]",
                                    "data.fields.answers=answers.text", "eval.baseline=true", "method=qlora"])
    assert recipe.train.lr == pytest.approx(1e-4) and isinstance(recipe.train.lr, float)
    assert recipe.train.max_steps == 7
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.fields == {"answers": "answers.text"}
    assert recipe.eval.baseline is True
    assert recipe.method == "qlora" and recipe.model.quantization == "4bit"


def test_override_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("task: qa\nmethod: lora\ntrain:\n  lr: 3.0e-4\n  batch_size: 8\n")
    recipe = load_recipe(path, ["train.batch_size=2"])
    assert (recipe.train.lr, recipe.train.batch_size) == (3e-4, 2)


@pytest.mark.parametrize("override, key, words", [
    ("train.lr=abc", "train.lr", "is not a number"),
    ("train.batch_size=0", "train.batch_size", "out of range"),
    ("train.batch_size=2.5", "train.batch_size", "is not an integer"),
    ("train.lrr=1e-4", "train.lrr", "did you mean train.lr?"),
    ("train.r=8", "train.r", "did you mean lora.r?"),
    ("model.quantization=3bit", "model.quantization", "one of none, 8bit, 4bit"),
    ("train.scheduler=cosin", "train.scheduler", "did you mean cosine?"),
])
def test_bad_override_is_reported_like_a_bad_file_value(override: str, key: str, words: str) -> None:
    assert words in only_problem(problems_of({"task": "qa", "method": "lora"}, (override,)), key)
    # The same value written in the file gives the same report.
    section, leaf = override.split("=")[0].split(".")
    document = {"task": "qa", "method": "lora", section: {leaf: yaml.safe_load(override.split("=", 1)[1])}}
    assert only_problem(problems_of(document), key) == only_problem(
        problems_of({"task": "qa", "method": "lora"}, (override,)), key)


@pytest.mark.parametrize("override", ["train.lr", "=3", " =3"])
def test_malformed_override_is_a_problem(override: str) -> None:
    problems = problems_of({"task": "qa", "method": "lora"}, (override,))
    assert any("section.key=value" in p for p in problems), problems


def test_overrides_do_not_modify_the_callers_document() -> None:
    document = {"task": "qa", "method": "lora", "data": {"fields": {"context": "passage"}}}
    load_recipe(document=document, overrides=["data.fields.question=query", "train.lr=1e-3"])
    assert document == {"task": "qa", "method": "lora", "data": {"fields": {"context": "passage"}}}


# --- YAML numbers, environment variables -------------------------------------------------------------------------

def test_yaml_exponent_without_dot_becomes_a_float(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("task: qa\nmethod: lora\ntrain:\n  lr: 1e-4\n  weight_decay: 1e-2\nlora:\n  alpha: 16\n")
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-4"  # what PyYAML hands over
    recipe = load_recipe(path)
    assert isinstance(recipe.train.lr, float) and recipe.train.lr == 1e-4
    assert recipe.train.weight_decay == 0.01
    assert isinstance(recipe.lora.alpha, float) and recipe.lora.alpha == 16.0


def test_environment_variables_expand_in_data_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"context": "a b", "question": "q", "answers": ["a"]}])
    document = {"task": "qa", "method": "lora", "data": {"train": "${LFT_TEST_DATA:-/nonexistent-dir}/train.jsonl"}}
    monkeypatch.delenv("LFT_TEST_DATA", raising=False)
    problem = only_problem(problems_of(document), "data.train")
    assert "/nonexistent-dir/train.jsonl" in problem and "not found" in problem  # the default was used
    monkeypatch.setenv("LFT_TEST_DATA", str(tmp_path))
    assert load_recipe(document=document).data.train == f"{tmp_path}/train.jsonl"
    monkeypatch.setenv("LFT_TEST_DATA", "")  # set but empty: the default applies, as in the shell
    assert "/nonexistent-dir/train.jsonl" in only_problem(problems_of(document), "data.train")


def test_environment_variable_without_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "t.jsonl", [])
    monkeypatch.setenv("LFT_TEST_DIR", str(tmp_path))
    recipe = load_recipe(document={"task": "qa", "method": "lora", "data": {"eval": "${LFT_TEST_DIR}/t.jsonl"}})
    assert recipe.data.eval == f"{tmp_path}/t.jsonl"


# --- method / quantization combinations, data files ----------------------------------------------------------------

@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_full_fine_tuning_of_quantized_weights_is_refused(quantization: str) -> None:
    problems = problems_of({"task": "qa", "method": "full", "model": {"quantization": quantization}})
    assert "method full" in only_problem(problems, "model.quantization")


@pytest.mark.parametrize("method, given, resolved", [
    ("qlora", None, "4bit"), ("qlora", "4bit", "4bit"),
    ("lora", None, "none"), ("lora", "8bit", "8bit"), ("lora", "4bit", "4bit"),
    ("full", None, "none"), ("full", "none", "none"),
])
def test_quantization_resolves(method: str, given: str | None, resolved: str) -> None:
    model = {"quantization": given} if given else {}
    assert load_recipe(document={"task": "qa", "method": method, "model": model}).model.quantization == resolved


@pytest.mark.parametrize("quantization", ["8bit", "none"])
def test_qlora_with_another_quantization_is_refused(quantization: str) -> None:
    problems = problems_of({"task": "qa", "method": "qlora", "model": {"quantization": quantization}})
    assert "qlora" in only_problem(problems, "model.quantization")


def test_missing_data_files_are_refused(tmp_path: Path) -> None:
    problems = problems_of({"task": "qa", "method": "lora",
                            "data": {"train": str(tmp_path / "nope.jsonl"), "eval": "./also-missing.csv"}})
    assert "nope.jsonl" in only_problem(problems, "data.train")
    assert "also-missing.csv" in only_problem(problems, "data.eval")


def test_data_path_under_home_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_jsonl(tmp_path / "train.jsonl", [{"context": "a b", "question": "q", "answers": ["a"]}])
    assert load_recipe(document={"task": "qa", "method": "lora", "data": {"train": "~/train.jsonl"}})


def test_labels_only_for_classification() -> None:
    problems = problems_of({"task": "qa", "method": "lora", "data": {"labels": ["a", "b"]}})
    only_problem(problems, "data.labels")
    recipe = load_recipe(document={"task": "classification", "method": "lora", "data": {"labels": ["a", "b"]}})
    assert recipe.data.labels == ["a", "b"]


# --- files ----------------------------------------------------------------------------------------------------------

def test_missing_recipe_file(tmp_path: Path) -> None:
    problems = problems_of(path=tmp_path / "nope.yaml")
    assert "file not found" in problems[0] and "nope.yaml" in problems[0]


@pytest.mark.parametrize("text, words", [("task: [qa\n", "not valid YAML"), ("- a\n- b\n", "top level")])
def test_unreadable_recipe_file(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert words in problems_of(path=path)[0]


def test_empty_recipe_file_reports_missing_task_and_method(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    problems = problems_of(path=path)
    only_problem(problems, "task")
    only_problem(problems, "method")


# --- dump / load round trip ------------------------------------------------------------------------------------------

def test_dump_recipe_loads_back_equal(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "t.jsonl", [])
    recipe = load_recipe(document={
        "task": "classification", "method": "qlora",
        "data": {"train": str(tmp_path / "t.jsonl"), "labels": ["neg", "pos"], "fields": {"text": "sentence"},
                 "limit_train": 10},
        "lora": {"target_modules": ["query", "value"], "alpha": 7},
        "train": {"lr": "1e-5", "max_steps": 3, "optimizer": "adamw8bit", "scheduler": "linear"},
        "eval": {"baseline": True}, "output": {"dir": str(tmp_path / "out"), "save_model": False}})
    text = dump_recipe(recipe)
    path = tmp_path / "dumped.yaml"
    path.write_text(text)
    again = load_recipe(path)
    assert again == recipe
    assert dump_recipe(again) == text
    # Every field of every section is written out, so the file states exactly what ran.
    dumped = yaml.safe_load(text)
    for name, cls in SECTIONS.items():
        assert set(dumped[name]) == {f.name for f in dataclasses.fields(cls)}


def test_recipe_is_frozen() -> None:
    recipe = load_recipe(document={"task": "qa", "method": "lora"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.train.lr = 1.0  # type: ignore[misc]


# --- former crashes, now recipe errors -----------------------------------------------------------------------------

def test_huge_integer_for_a_float_key_is_a_recipe_error() -> None:
    problems_of({"task": "qa", "method": "lora", "train": {"lr": 10 ** 400}})


def test_overlong_data_path_is_a_recipe_error() -> None:
    problems_of({"task": "qa", "method": "lora", "data": {"train": "x" * 300 + ".jsonl"}})


# --- property: load_recipe returns a Recipe or raises RecipeError, nothing else -------------------------------------

_KNOWN = sorted({"task", "method", *SECTIONS} | {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)})
_WORDS = ["qa", "classification", "instruction", "full", "lora", "qlora", "none", "8bit", "4bit", "auto", "cpu",
          "cuda", "cosine", "adamw8bit", "all-linear", "builtin:qa-train", "builtin:nope", "x.jsonl", "./d.csv",
          "~/a.parquet", "rajpurkar/squad", "1e-4", "2.0e-4", "-1", "0", "${HOME}", "${LFT_UNSET:-/none}/a.jsonl",
          "", " ", "null", "true", "[a, b]", "{a: b}"]
_keys = st.sampled_from(_KNOWN) | st.text(max_size=8)
# Integers are bounded to what a float can hold and texts are short: the unbounded cases have their own tests
# above (a huge integer for a float key, an overlong path); everything else must hold for any value.
_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=True)
            | st.text(max_size=24) | st.sampled_from(_WORDS))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
                       max_leaves=8)
_sections = st.dictionaries(st.sampled_from(_KNOWN) | st.text(max_size=6), _values, max_size=6)
_documents = st.dictionaries(st.sampled_from(_KNOWN) | st.text(max_size=6), _sections | _values, max_size=8)
_dotted = st.lists(st.sampled_from(_KNOWN) | st.text(max_size=5), min_size=1, max_size=3).map(".".join)
_overrides = st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", _dotted,
                                                        st.sampled_from(_WORDS) | st.text(max_size=12)), max_size=4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_documents, overrides=_overrides)
def test_load_recipe_returns_a_recipe_or_raises_recipe_error(document: dict[str, Any], overrides: list[str]) -> None:
    try:
        recipe = load_recipe(document=document, overrides=overrides)
    except RecipeError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return
    assert isinstance(recipe, Recipe)
    assert load_recipe(document=yaml.safe_load(dump_recipe(recipe))) == recipe


@settings(max_examples=100, deadline=None)
@given(task=st.sampled_from(["qa", "classification", "instruction"]), method=st.sampled_from(["full", "lora", "qlora"]),
       lr=st.floats(1e-7, 0.9), r=st.integers(1, 256), steps=st.none() | st.integers(1, 10 ** 6),
       batch=st.integers(1, 512), dropout=st.floats(0, 0.99))
def test_valid_values_always_load_and_round_trip(task: str, method: str, lr: float, r: int, steps: int | None,
                                                 batch: int, dropout: float) -> None:
    document = {"task": task, "method": method, "lora": {"r": r, "dropout": dropout},
                "train": {"lr": lr, "max_steps": steps, "batch_size": batch}}
    recipe = load_recipe(document=document)
    assert (recipe.train.lr, recipe.lora.r, recipe.train.max_steps, recipe.train.batch_size) == (lr, r, steps, batch)
    assert load_recipe(document=yaml.safe_load(dump_recipe(recipe))) == recipe
