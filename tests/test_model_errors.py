"""Models that cannot be used are refused with a message that says what to fix, never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from lite_ft.cli import main
from lite_ft.recipe.load import load_recipe
from lite_ft.errors import LiteFTError
from lite_ft.model import build
from lite_ft.sources.resolve import convert_gguf


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_file_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path,
                                                  make_doc: Callable[..., dict[str, Any]]) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(LiteFTError, match="cannot load|not a valid safetensors") as err:
        build(load_recipe(document=make_doc(model={"source": str(folder)})))
    assert str(folder) in str(err.value) and "again" in str(err.value)


def test_missing_weights_file_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path,
                                                make_doc: Callable[..., dict[str, Any]]) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(LiteFTError, match="cannot load"):
        build(load_recipe(document=make_doc(model={"source": str(folder)})))


def test_config_that_does_not_match_the_weights_is_a_clear_error(tiny_llama_dir: Path, tmp_path: Path,
                                                                 make_doc: Callable[..., dict[str, Any]]) -> None:
    folder = copy_model(tiny_llama_dir, tmp_path / "mismatch")
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 128  # the weights are 64 wide
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LiteFTError, match="config.json may not match"):
        build(load_recipe(document=make_doc(model={"source": str(folder)})))


def test_folder_without_config_is_refused(tmp_path: Path, make_doc: Callable[..., dict[str, Any]],
                                          write_recipe: Callable[..., Path]) -> None:
    (tmp_path / "empty-model").mkdir()
    path = write_recipe(make_doc(model={"source": str(tmp_path / "empty-model")}))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1 and "no config.json" in result.output and "Traceback" not in result.output


def test_gguf_that_is_not_a_gguf_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LiteFTError, match="GGUF"):
        convert_gguf(fake)
