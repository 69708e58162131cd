"""lite_ft.plan.op_times: the ops a meta replay dispatches are recorded with their shapes, each can be run again on
real CPU tensors (views, expanded and transposed arguments included), its time grows with its work, and times are
cached per machine so a second plan measures nothing."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lite_ft.plan import op_times
from lite_ft.plan.op_times import OpTimes, OpTrace, update_seconds


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITE_FT_CACHE", str(tmp_path / "cache"))


def _trace(n: int) -> OpTrace:
    """A meta computation with a transposed weight (mm), an expanded tensor made contiguous and a reduction."""
    x = torch.empty(n, n, device="meta")
    w = torch.empty(n, n, device="meta")
    with OpTrace() as trace:
        y = x @ w.t()
        z = torch.empty(n, 1, device="meta").expand(n, n).contiguous()
        (y * z).sum()
    return trace


def test_the_trace_records_each_op_with_its_shapes_and_strides() -> None:
    trace = _trace(64)
    names = {sig[0] for sig in trace.counts}
    assert {"aten.mm.default", "aten.clone.default", "aten.mul.Tensor", "aten.sum.default"} <= names
    mm = next(sig for sig in trace.counts if sig[0] == "aten.mm.default")
    assert mm[1] == (("T", (64, 64), (64, 1), "float32"), ("T", (64, 64), (1, 64), "float32"))  # w.t(): strides
    assert not any(sig[0] in op_times.SKIP for sig in trace.counts)  # views cost nothing and are not timed


def test_flops_of_the_trace_are_torchs_own_count() -> None:
    """OpTrace.flops applies torch's FLOP formulas to the recorded ops: the same total as FlopCounterMode."""
    x, w, b = (torch.empty(*s, device="meta") for s in ((8, 32, 64), (48, 64), (48,)))
    with FlopCounterMode(display=False) as counter, OpTrace() as trace:
        y = torch.nn.functional.linear(x, w, b)  # addmm
        (y @ y.transpose(1, 2)).sum()  # bmm
        x.reshape(-1, 64) @ w.t()  # mm
    assert trace.flops() == counter.get_total_flops() > 0


def test_in_place_matmuls_count_as_their_out_of_place_forms() -> None:
    """The fused LoRA blocks accumulate into their outputs with addmm_: 2 m k n FLOPs like addmm, not 0 (torch's
    registry has no entry for the in-place ops)."""
    c, a, b = (torch.empty(*s, device="meta") for s in ((16, 48), (16, 32), (32, 48)))
    cb, ab, bb = (torch.empty(*s, device="meta") for s in ((4, 16, 48), (4, 16, 32), (4, 32, 48)))
    with OpTrace() as trace:
        c.addmm_(a, b, alpha=0.5)
        cb.baddbmm_(ab, bb)
    assert trace.flops() == 2 * 16 * 32 * 48 * 5


def test_every_op_is_timed_on_real_tensors_and_more_work_takes_longer() -> None:
    table = OpTimes("test-machine")
    small, untimed_small = table.seconds(_trace(128))
    large, untimed_large = table.seconds(_trace(1024))  # 512x the matmul FLOPs, 64x the element-wise work
    assert untimed_small == untimed_large == 0  # the expanded (stride 0) argument was rebuilt too
    assert 0 < small < large


def test_times_are_cached_per_machine() -> None:
    first = OpTimes("test-machine")
    first.seconds(_trace(96))
    assert first.measured > 0
    first.save()
    again = OpTimes("test-machine")
    again.seconds(_trace(96))
    assert again.measured == 0  # read back, not measured again
    other = OpTimes("another-machine")
    other.seconds(_trace(96))
    assert other.measured == first.measured


def test_the_update_is_timed_on_all_the_trainable_shapes_together() -> None:
    """Clipping and the optimizer step run over the real list of parameters (one timing for the list, not one per
    shape): more tensors take longer, and the list's time is cached."""
    table = OpTimes("test-machine")
    one = update_seconds([(256, 256)], "adamw", table)
    more = update_seconds([(256, 256)] * 6 + [(64, 256)] * 2, "adamw", table)  # 6.5x the values, 8x the tensors
    assert 0 < one < more
    measured = table.measured
    assert update_seconds([(256, 256)], "adamw", table) == one and table.measured == measured


def test_a_large_model_is_timed_on_a_sample_and_scaled_by_its_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(op_times, "UPDATE_VALUES", 256 * 256)
    table = OpTimes("test-machine")
    one = update_seconds([(256, 256)], "adamw", table)
    eight = update_seconds([(256, 256)] * 8, "adamw", table)  # every 8th: the one tensor above, times 8
    assert eight == pytest.approx(8 * one)
    assert update_seconds([(1024, 256)], "adamw", table) > 0  # one tensor over the cap: timed on the cap's values
