"""What a new user breaks gets a message, never a traceback: limits a real run cannot reach, thousands of unknown
keys, a folder given as a data file, over-long rows, a cut-short GGUF, an unwritable or over-long output.dir; and
the resume keys come from the schema."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from helpers import write_jsonl
from lite_ft.cli import main
from lite_ft.errors import SHOWN_PROBLEMS, RecipeError
from lite_ft.recipe.load import load_recipe
from lite_ft.recipe.schema import SECTIONS, Recipe
from lite_ft.training.checkpoint import MATERIAL


def problems_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe(document=document)
    return err.value.problems


@pytest.mark.parametrize("key, value", [("data.max_length", 10**12), ("train.batch_size", 10**7),
                                        ("train.max_steps", 10**20), ("train.grad_accum", 10**6),
                                        ("lora.r", 10**6), ("eval.max_new_tokens", 10**9)])
def test_values_no_run_can_reach_are_refused(key: str, value: int) -> None:
    section, leaf = key.split(".")
    found = problems_of({"task": "qa", "method": "lora", section: {leaf: value}})
    assert len(found) == 1 and found[0].startswith(f"{key}: {value!r} is out of range; use ")


def test_thousands_of_unknown_keys_show_the_first_twenty_and_a_count() -> None:
    document = {"task": "qa", "method": "lora", "train": {f"key{i}": i for i in range(52_000)}}
    with pytest.raises(RecipeError) as err:
        load_recipe(document=document)
    lines = str(err.value).splitlines()
    assert len(err.value.problems) == 52_000 and len(lines) == 1 + SHOWN_PROBLEMS + 1
    assert "51,980 more" in lines[-1]


def test_a_folder_given_as_a_data_file(make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path],
                                       tmp_path: Path) -> None:
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    result = CliRunner().invoke(main, ["run", str(write_recipe(make_doc("qa", "lora"))), f"data.train={folder}"])
    assert result.exit_code == 1 and "is a folder" in result.output and "Traceback" not in result.output


def test_an_over_long_row_is_cut_before_tokenizing_and_counted(make_doc: Callable[..., dict[str, Any]],
                                                               write_recipe: Callable[..., Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"text": "a fine film", "label": 1}, {"text": "dull " * 1_000_000, "label": 0},  # a 5 MB row
            {"text": "bad acting", "label": 0}, {"text": "great cast", "label": 1}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    doc = make_doc("classification", "lora", data={"train": str(data), "eval": str(data), "labels": ["n", "p"]},
                   train={"max_steps": 1})
    from transformers import PreTrainedTokenizerFast

    longest: list[int] = []
    real = PreTrainedTokenizerFast.__call__

    def measured(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        longest.append(len(text) if isinstance(text, str) else 0)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", measured)
    result = CliRunner().invoke(main, ["run", str(write_recipe(doc))])
    assert result.exit_code == 0, result.output
    report = json.loads((Path(doc["output"]["dir"]) / "data_report.json").read_text())
    assert report["train"]["truncated"] == 1 and "1 examples truncated" in result.output
    assert max(longest) < 64 * 600  # max_length 64 x the longest token, not 5 MB


def test_a_cut_short_gguf_is_a_message(make_doc: Callable[..., dict[str, Any]], write_recipe: Callable[..., Path],
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITE_FT_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 9))  # magic, version, then it ends
    result = CliRunner().invoke(main, ["run", str(write_recipe(make_doc("qa", "lora"))), f"model.source={broken}"])
    assert result.exit_code == 1 and "model.gguf" in result.output and "Traceback" not in result.output


def test_an_output_dir_name_longer_than_the_file_system_allows(make_doc: Callable[..., dict[str, Any]],
                                                                write_recipe: Callable[..., Path],
                                                                tmp_path: Path) -> None:
    out = tmp_path / ("x" * 300)
    result = CliRunner().invoke(main, ["run", str(write_recipe(make_doc("qa", "lora"))), f"output.dir={out}"])
    assert result.exit_code == 1 and "longer than the file system allows" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("mount")),
                    reason="mounting a read-only file system needs root")
def test_an_output_dir_on_a_read_only_file_system(make_doc: Callable[..., dict[str, Any]],
                                                  write_recipe: Callable[..., Path], tmp_path: Path) -> None:
    disk = tmp_path / "ro"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        result = CliRunner().invoke(main, ["run", str(write_recipe(make_doc("qa", "lora"))),
                                           f"output.dir={disk / 'run'}"])
        assert result.exit_code == 1 and "read-only" in result.output and "Traceback" not in result.output
    finally:
        subprocess.run(["umount", "-l", str(disk)])  # lazy: tensors may still map its files


def test_every_schema_field_declares_whether_it_changes_the_result() -> None:
    undeclared = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
                  if "result" not in f.metadata]
    undeclared += [f.name for f in dataclasses.fields(Recipe) if f.name not in SECTIONS and "result" not in f.metadata]
    assert undeclared == []
    assert "data.overlong" in MATERIAL and "train.effective_batch" in MATERIAL
    assert "train.batch_size" not in MATERIAL and "train.log_every" not in MATERIAL
