"""Data: unusable rows are skipped and counted by reason, a run with no usable example stops before any model is
loaded, and the built-in sets are sound."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import ASSETS, read_jsonl, write_jsonl
from lite_ft.recipe.load import DataConfig, load_recipe
from lite_ft.data.load import BUILTIN, get_path, load_rows, load_splits
from lite_ft.errors import DataError
from lite_ft.data.tasks import get_task

CONTEXT = "The Sallow River runs past the old mill, where a baker named Odile Fenwick opened a shop in 1874."


def prepare(task: str, rows: list[Any], tmp_path: Path, **cfg: Any):
    """Write rows as a jsonl file, read it back with load_rows, and run the task's prepare on it."""
    path = write_jsonl(tmp_path / f"{task}.jsonl", rows)
    return get_task(task).prepare(load_rows(str(path), "train", "data.train"), DataConfig(**cfg), "train")


# --- qa ---------------------------------------------------------------------------------------------------------------

def test_qa_prepare_skips_and_counts(tmp_path: Path) -> None:
    good = {"id": "ok-1", "context": CONTEXT, "question": "Who opened a shop?", "answers": {"text": ["Odile Fenwick"]}}
    rows = [
        good,
        "{not json",                                                                   # malformed
        "[1, 2, 3]",                                                                   # JSON, but not an object
        {"context": CONTEXT, "answers": {"text": ["1874"]}},                           # no question
        {"context": 42, "question": "When?", "answers": {"text": ["1874"]}},           # wrong type
        {"context": CONTEXT, "question": "When?", "answers": 1874},                    # wrong type
        {"context": CONTEXT, "question": "   ", "answers": {"text": ["1874"]}},        # empty question
        {"context": "", "question": "When?", "answers": {"text": ["1874"]}},           # empty context
        {"context": CONTEXT, "question": "When?", "answers": {"text": ["", 5, None]}}, # no usable answer
        {"context": CONTEXT, "question": "Which river?", "answers": {"text": ["the Thames"]}},  # not a span
        {"context": CONTEXT, "question": "When?", "answers": {"text": ["in 1874", "1874 AD"]}},  # one span is enough
        {"context": CONTEXT, "question": "Where?", "answers": {"text": "the old mill"}},        # a bare string
        "",                                                                            # blank line: ignored
    ]
    split = prepare("qa", rows, tmp_path)
    assert split.skipped == Counter({
        "malformed JSON line": 1,
        "line is not a JSON object": 1,
        "missing or wrong-typed field (context, question, answers)": 3,
        "empty text": 3,
        "answer not in context": 1,
    })
    assert [e["question"] for e in split.examples] == ["Who opened a shop?", "When?", "Where?"]
    assert split.examples[0] == {"id": "ok-1", "context": CONTEXT, "question": "Who opened a shop?",
                                 "answers": ["Odile Fenwick"]}
    assert split.examples[1]["answers"] == ["in 1874", "1874 AD"]       # every reference kept for scoring
    assert split.examples[2]["answers"] == ["the old mill"]
    assert len(split.examples) + sum(split.skipped.values()) == 12
    report = split.report()
    assert report["used"] == 3 and set(report["examples_of_skipped"]) == set(split.skipped)


def test_qa_fields_mapping_reads_nested_columns(tmp_path: Path) -> None:
    rows = [{"passage": {"body": CONTEXT}, "q": "When?", "gold": ["1874"]}]
    split = prepare("qa", rows, tmp_path, fields={"context": "passage.body", "question": "q", "answers": "gold"})
    assert split.examples == [{"id": "train-0", "context": CONTEXT, "question": "When?", "answers": ["1874"]}]
    unmapped = prepare("qa", rows, tmp_path)
    assert not unmapped.examples and sum(unmapped.skipped.values()) == 1


def test_get_path() -> None:
    row = {"a": {"b": {"c": 1}}, "x": [1]}
    assert get_path(row, "a.b.c") == 1
    assert get_path(row, "a.b") == {"c": 1}
    assert get_path(row, "a.z") is None and get_path(row, "x.0") is None


# --- classification ----------------------------------------------------------------------------------------------------

def test_classification_prepare_with_label_names(tmp_path: Path) -> None:
    rows = [
        {"text": "great film", "label": 1},
        {"text": "dull film", "label": "negative"},            # a name from data.labels
        {"text": "fine film", "label": "1"},                   # a digit string
        {"text": "okay film", "label": 0.0},                   # an integral float
        {"sentence": "GLUE-style column", "label": 0},         # `sentence` needs no mapping
        {"text": "three stars", "label": 2},                   # outside the label set
        {"text": "minus one", "label": -1},
        {"text": "unsure", "label": "maybe"},
        {"text": "half", "label": 0.5},
        {"text": "boolean", "label": True},                    # bools are not labels
        {"text": "no label"},
        {"label": 1},                                          # no text
        {"text": 123, "label": 1},
        {"text": "   ", "label": 1},                           # empty text
        "not json at all",
    ]
    split = prepare("classification", rows, tmp_path, labels=["negative", "positive"])
    assert split.skipped == Counter({
        "label outside the label set": 4,
        "missing or wrong-typed field (text, label)": 4,
        "empty text": 1,
        "malformed JSON line": 1,
    })
    assert [(e["text"], e["label"]) for e in split.examples] == [
        ("great film", 1), ("dull film", 0), ("fine film", 1), ("okay film", 0), ("GLUE-style column", 0)]
    assert all(isinstance(e["label"], int) for e in split.examples)
    assert get_task("classification").num_labels(DataConfig(labels=["negative", "positive"]), split) == 2


def test_classification_labels_without_names(tmp_path: Path) -> None:
    split = prepare("classification", [{"text": "a", "label": 0}, {"text": "b", "label": 3},
                                       {"text": "c", "label": "2"}], tmp_path)
    assert [e["label"] for e in split.examples] == [0, 3, 2]
    assert get_task("classification").num_labels(DataConfig(), split) == 4


def test_classification_string_labels_without_data_labels(tmp_path: Path) -> None:
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"},
            {"text": "great", "label": "positive"}]
    split = prepare("classification", rows, tmp_path)
    assert len(split.examples) == 3
    labels = [e["label"] for e in split.examples]
    assert labels[0] == labels[2] != labels[1] and set(labels) == {0, 1}


# --- instruction -------------------------------------------------------------------------------------------------------

def test_instruction_prepare_skips_and_counts(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Translate.", "input": "bonjour", "output": "good morning", "id": "t-1"},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "no reply"}]},                  # falls back, no instruction
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}]},  # no assistant turn
        {"instruction": "Say hi.", "output": 5},                                  # wrong type
        {"instruction": "Say hi.", "input": 7, "output": "hi"},                   # wrong type
        {"instruction": "Say hi.", "output": "   "},                              # empty response
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},  # empty prompt
        "{]",
    ]
    split = prepare("instruction", rows, tmp_path)
    assert split.skipped == Counter({
        "missing or wrong-typed field (instruction, output or messages)": 4,
        "empty text": 2,
        "malformed JSON line": 1,
    })
    assert [e["response"] for e in split.examples] == ["hi", "good morning", "4"]
    assert split.examples[1]["messages"] == [{"role": "user", "content": "Translate.\n\nbonjour"}]
    assert split.examples[1]["id"] == "t-1"
    assert split.examples[2]["messages"] == [{"role": "user", "content": "2+2?"}]


# --- no usable example: fail before the model -------------------------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(*args: Any, **kwargs: Any) -> None:
        pytest.fail("the model was loaded although the data has no usable example")

    monkeypatch.setattr("lite_ft.run.build", build)


@pytest.mark.parametrize("task, rows", [
    ("qa", ["{bad", {"context": "abc", "question": "q", "answers": ["zzz"]}]),
    ("classification", [{"text": "a", "label": 7}, {"sentence": "", "label": 0}]),
    ("instruction", [{"prompt": "wrong column", "completion": "x"}]),
])
def test_no_usable_training_example_fails_before_the_model(task: str, rows: list[Any], tmp_path: Path,
                                                           make_doc: Callable[..., dict[str, Any]],
                                                           no_model: None) -> None:
    from lite_ft.run import run

    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    recipe = load_recipe(document=make_doc(task, "lora", data={"train": str(path), "eval": None,
                                                               "limit_train": None}))
    with pytest.raises(DataError) as info:
        run(recipe)
    message = str(info.value)
    assert message.startswith("data.train: no usable example") and str(path) in message
    assert "data.fields" in message                          # says how to map the columns
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_no_usable_eval_example_fails_before_the_model(tmp_path: Path, make_doc: Callable[..., dict[str, Any]],
                                                       no_model: None) -> None:
    from lite_ft.run import run

    path = write_jsonl(tmp_path / "eval.jsonl", ["oops", "{}"])
    recipe = load_recipe(document=make_doc("qa", "lora", data={"eval": str(path)}))
    with pytest.raises(DataError, match=r"data\.eval: no usable example .*1 malformed JSON line"):
        run(recipe)


def _lengths_and_cut(make_doc: Callable[..., dict[str, Any]], tiny_llama_dir: Path) -> tuple[list[int], int]:
    """Token counts of the 8 training examples with the tiny tokenizer, and a max_length that some exceed."""
    from transformers import AutoTokenizer

    recipe = load_recipe(document=make_doc("qa", "lora", data={"eval": None}))
    task = get_task("qa")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lengths = [len(task.encode(e, tokenizer, recipe)["input_ids"]) for e in load_splits(recipe, task)[0].examples]
    cut = sorted(lengths)[len(lengths) // 2]
    assert 0 < sum(n > cut for n in lengths) < len(lengths)
    return lengths, cut


def test_too_long_examples_are_skipped_and_counted(make_doc: Callable[..., dict[str, Any]],
                                                   tiny_llama_dir: Path) -> None:
    from lite_ft.run import run

    lengths, cut = _lengths_and_cut(make_doc, tiny_llama_dir)
    metrics = run(load_recipe(document=make_doc("qa", "lora", data={"max_length": cut, "eval": None},
                                                train={"max_steps": 1})))
    report = metrics["data"]["train"]
    assert report["skipped"] == {f"longer than data.max_length ({cut} tokens)": sum(n > cut for n in lengths)}
    assert report["used"] == sum(n <= cut for n in lengths)  # used + skipped = the rows read


def test_unknown_builtin_and_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="builtin:qa-train"):
        load_rows("builtin:nope", "train", "data.train")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        load_rows(str(tmp_path / "data.txt"), "train", "data.train")


def test_csv_and_limits(tmp_path: Path, make_doc: Callable[..., dict[str, Any]]) -> None:
    path = tmp_path / "s.csv"
    path.write_text("sentence,label\n" + "".join(f"sentence number {i},{i % 2}\n" for i in range(10)))
    recipe = load_recipe(document=make_doc("classification", "lora",
                                           data={"train": str(path), "eval": str(path), "limit_train": 4,
                                                 "limit_eval": 3}))
    train, evals = load_splits(recipe, get_task("classification"))
    assert [e["label"] for e in train.examples] == [0, 1, 0, 1]
    assert len(evals.examples) == 3 and evals.report()["used"] == 3


def test_holdout_splits_train_rows_reproducibly(tmp_path: Path, make_doc: Callable[..., dict[str, Any]]) -> None:
    recipe = load_recipe(document=make_doc("qa", "lora", data={"eval": None, "holdout": 30, "limit_train": None,
                                                               "limit_eval": None}))
    task = get_task("qa")
    train, evals = load_splits(recipe, task)
    again_train, again_evals = load_splits(recipe, task)
    ids = lambda split: [e["id"] for e in split.examples]  # noqa: E731
    assert len(evals.examples) == 30 and len(train.examples) == 384 - 30
    assert not set(ids(train)) & set(ids(evals))
    assert ids(evals) == ids(again_evals) and ids(train) == ids(again_train)


# --- built-in sets ----------------------------------------------------------------------------------------------------

def test_builtin_sets_load_without_skips() -> None:
    for name, file in BUILTIN.items():
        rows = load_rows(f"builtin:{name}", "train", "data.train")
        assert rows == read_jsonl(ASSETS / file)
        task = "qa" if name.startswith("qa") else "classification"
        split = get_task(task).prepare(rows, DataConfig(), "train")
        assert not split.skipped and len(split.examples) == len(rows)
        assert len(rows) >= (300 if name.endswith("train") else 100), name
        assert len({r["id"] for r in rows}) == len(rows), f"{name}: duplicate ids"


def test_builtin_qa_answers_are_exact_spans() -> None:
    for name in ("qa_train", "qa_eval"):
        for row in read_jsonl(ASSETS / f"{name}.jsonl"):
            answers = row["answers"]
            assert answers["text"] and len(answers["text"]) == len(answers["answer_start"])
            for text, start in zip(answers["text"], answers["answer_start"]):
                assert text and row["context"][start:start + len(text)] == text, (row["id"], text)


def test_builtin_train_and_eval_do_not_share_passages_or_sentences() -> None:
    train = {r["context"] for r in read_jsonl(ASSETS / "qa_train.jsonl")}
    evals = {r["context"] for r in read_jsonl(ASSETS / "qa_eval.jsonl")}
    assert len(train) >= 50 and len(evals) >= 20 and not train & evals
    train_s = {r["sentence"].strip().lower() for r in read_jsonl(ASSETS / "sentiment_train.jsonl")}
    eval_s = {r["sentence"].strip().lower() for r in read_jsonl(ASSETS / "sentiment_eval.jsonl")}
    assert not train_s & eval_s


def test_builtin_sentiment_labels_are_binary_and_balanced() -> None:
    for name in ("sentiment_train", "sentiment_eval"):
        labels = Counter(r["label"] for r in read_jsonl(ASSETS / f"{name}.jsonl"))
        assert set(labels) == {0, 1} and all(type(k) is int for k in labels)
        assert min(labels.values()) >= 0.4 * sum(labels.values()), labels


def test_jsonl_reader_keeps_line_order_and_marks_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n\n\xff\xfe garbage\n"a string"\n{"a": 2}\n')
    rows = load_rows(str(path), "train", "data.train")
    assert [r if isinstance(r, dict) else r.reason for r in rows] == [
        {"a": 1}, "line not UTF-8 encoded", "line is not a JSON object", {"a": 2}]


# --- encoding: the loss covers the answer only ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def completion(encoded: dict[str, list[int]]) -> list[int]:
    labels = encoded["labels"]
    first = next(i for i, t in enumerate(labels) if t != -100)
    assert all(t == -100 for t in labels[:first]) and all(t != -100 for t in labels[first:])
    assert encoded["input_ids"][first:] == labels[first:]
    return labels[first:]


@pytest.mark.parametrize("chat", [True, False])
def test_qa_encoding_puts_the_loss_on_the_answer_only(tiny_tokenizer: Any, chat: bool) -> None:
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    if not chat:
        tokenizer.chat_template = None  # plain "passage, question, Answer:" prompt
    task = get_task("qa")
    example = {"id": "x", "context": CONTEXT, "question": "When did the shop open?",
               "answers": ["the Thames", "in 1874"]}   # the first reference that is a span is trained on
    recipe = load_recipe(document={"task": "qa", "method": "lora", "data": {"system_prompt": "Be brief."}})
    encoded = task.encode(example, tokenizer, recipe)
    answer = completion(encoded)
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "in 1874"
    prompt = tokenizer.decode(encoded["input_ids"][: len(encoded["input_ids"]) - len(answer)])
    assert "When did the shop open?" in prompt and "Odile Fenwick" in prompt
    assert prompt.index("Be brief.") < prompt.index("Passage:")  # the system prompt comes first
    if chat:
        assert prompt.rstrip().endswith("assistant")  # the template's generation prompt
    else:
        assert prompt.rstrip().endswith("Answer:")
    short = load_recipe(document={"task": "qa", "method": "lora", "data": {"max_length": 16}})
    assert task.encode(example, tokenizer, short) is None  # never cut an answer off: skip instead


def test_instruction_encoding_uses_the_chat_template(tiny_tokenizer: Any) -> None:
    task = get_task("instruction")
    recipe = load_recipe(document={"task": "instruction", "method": "lora"})
    example = {"id": "x", "messages": [{"role": "user", "content": "Capital of Peru?"}], "response": "Lima."}
    encoded = task.encode(example, tiny_tokenizer, recipe)
    answer = completion(encoded)
    assert tiny_tokenizer.decode(answer, skip_special_tokens=True).strip() == "Lima."
    expected_prompt = tiny_tokenizer.apply_chat_template(example["messages"], add_generation_prompt=True,
                                                         tokenize=True)["input_ids"]
    assert encoded["input_ids"][: len(expected_prompt)] == list(expected_prompt)
    assert len(expected_prompt) + len(answer) == len(encoded["input_ids"])


def test_lines_in_another_encoding_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"text": "fine film", "label": 1})
    path.write_bytes(good.encode() + b"\n" + json.dumps({"text": "caf\u00e9", "label": 0}, ensure_ascii=False)
                     .encode("latin-1") + b"\n")
    from lite_ft.data.load import load_rows
    from lite_ft.data.tasks import get_task

    recipe = load_recipe(document={"task": "classification", "method": "lora", "data": {"train": str(path)}})
    split = get_task("classification").prepare(load_rows(str(path), "train", "data.train"), recipe.data, "train")
    assert split.skipped == Counter({"line not UTF-8 encoded": 1})
    assert [e["text"] for e in split.examples] == ["fine film"]


def test_overlong_examples_are_skipped_or_truncated_as_the_recipe_says(tiny_llama_dir: Path) -> None:
    from lite_ft.model import load_tokenizer
    from lite_ft.data.tasks import get_task

    example = {"id": "x", "messages": [{"role": "user", "content": "Say it."}], "response": "word " * 200}
    base = {"task": "instruction", "method": "lora", "model": {"source": str(tiny_llama_dir)},
            "data": {"train": "builtin:qa-train", "max_length": 64}}
    skip = load_recipe(document=base)
    tokenizer = load_tokenizer(str(tiny_llama_dir), skip)
    task = get_task("instruction")
    assert task.encode(example, tokenizer, skip) is None
    cut = load_recipe(document=base, overrides=["data.overlong=truncate"])
    encoded = task.encode(example, tokenizer, cut)
    assert len(encoded["input_ids"]) == 64
    assert encoded["labels"][-1] != -100 and encoded["labels"][0] == -100   # the prompt is kept whole
    long_text = {"id": "y", "text": "word " * 200, "label": 1}
    cls = get_task("classification")
    cls_base = base | {"task": "classification"}
    assert len(cls.encode(long_text, tokenizer, load_recipe(document=cls_base))["input_ids"]) == 64  # auto: cut
    assert cls.encode(long_text, tokenizer, load_recipe(document=cls_base, overrides=["data.overlong=skip"])) is None
