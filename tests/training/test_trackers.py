"""output.report_to: [tensorboard] writes the training curve through accelerate's tracker; read back from the event
file, it is the curve train_log.jsonl holds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from lite_ft.errors import RecipeError
from lite_ft.recipe.load import load_recipe
from lite_ft.run import run


def test_tensorboard_event_file_holds_the_training_curve(make_doc: Callable[..., dict[str, Any]]) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    doc = make_doc("qa", "lora", train={"max_steps": 4, "log_every": 1}, output={"report_to": ["tensorboard"]})
    run(load_recipe(document=doc))
    out = Path(doc["output"]["dir"])
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    curve = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in curve] == [e["step"] for e in logged]
    assert [v for _, v in curve] == pytest.approx([e["loss"] for e in logged], rel=1e-6)
    assert {"train/lr", "train/tokens_per_second", "train/memory_mib"} <= set(acc.Tags()["scalars"])


def test_an_unknown_or_missing_tracker_is_a_recipe_problem(make_doc: Callable[..., dict[str, Any]]) -> None:
    with pytest.raises(RecipeError, match="not a tracker lite-ft knows"):
        load_recipe(document=make_doc("qa", "lora", output={"report_to": ["tensorbord"]}))
