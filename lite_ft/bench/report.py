"""The files `lite-ft bench` writes: bench.json (everything, with the machine), bench.csv, bench.md and two plots."""
from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path
from typing import Any

import psutil

from lite_ft.util import versions

# The table's columns, in order, and what each means: also the help text of `lite-ft bench`.
COLUMNS: dict[str, str] = {
    "method": "full, lora, qlora (4-bit NF4 base) or lora-8bit (8-bit base)",
    "status": "ok, or failed (the error column says why)",
    "trainable_params": "parameters the optimizer updates",
    "total_params": "all parameters (a 4-bit weight counts as one parameter)",
    "peak_memory_mib": "highest memory of the whole run, MiB (CPU: process RSS; CUDA: allocated tensors)",
    "predicted_peak_mib": "what `lite-ft plan` predicted for the run before loading it (train.memory_check), MiB",
    "peak_phase": "where that peak happened: model_load, first_forward, ..., evaluation, save",
    "training_peak_mib": "highest memory while training, MiB: the sum of the next six columns",
    "weights_mib": "frozen weights (quantized or not), MiB",
    "trainable_mib": "trainable parameters (LoRA adapters, or every weight for full), MiB",
    "gradients_mib": "their gradients, MiB",
    "optimizer_mib": "optimizer state (AdamW: two moments per trainable parameter), MiB",
    "activations_mib": "the rest of the training peak: activations, workspace, allocator slack, MiB",
    "live_activations_mib": "of that, the live tensors of the run's longest micro-batch, replayed by `lite-ft plan` "
                            "(activations kept for backward, output layer and backward workspace), MiB",
    "allocator_overhead_mib": "the rest: memory the allocator holds beyond the live tensors (CPU: glibc's heap), MiB",
    "runtime_mib": "CPU only: the process before the model was loaded (Python, PyTorch), MiB",
    "tokens_per_second": "training throughput counting only real (non-padding) tokens",
    "seconds_per_step": "wall-clock seconds per optimizer step",
    "final_loss": "mean training loss over the last logging window",
    "exact_match / f1": "qa: SQuAD exact match and token F1 on the eval data, percent",
    "accuracy / macro_f1": "classification: accuracy and macro-averaged F1 on the eval data, percent",
    "<score>_95ci / n": "each score's 95% interval over the eval examples (Wilson for accuracy and exact match, "
                        "else a seeded bootstrap), and how many examples were scored",
    "eval_examples_per_second": "evaluation speed (batched greedy decoding for qa)",
    "wall_seconds": "the method's whole run, model loading and evaluation included",
    "processes": "processes the method trained on (--nproc); tokens/s is their total",
    "rank_peak_memory_mib": "with several processes: each rank's peak memory, MiB, rank 0 first",
    "error": "why a failed method failed",
}
_PARTS = {"trainable_mib": "trainable parameters", "gradients_mib": "gradients", "optimizer_mib": "optimizer state",
          "activations_mib": "activations and workspace", "runtime_mib": "runtime"}


def environment() -> dict[str, Any]:
    """The machine and software the figures come from."""
    import torch  # here, not at the top: the CLI reads COLUMNS for `lite-ft bench --help`, which needs no torch

    env: dict[str, Any] = {"cpu": _cpu_model(), "logical_cores": os.cpu_count(),
                           "physical_cores": psutil.cpu_count(logical=False),
                           "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
                           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                           "platform": platform.platform(), "versions": versions()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "count": torch.cuda.device_count(), "cuda": torch.version.cuda}
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_rows(record: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The CSV/Markdown columns for this bench (score columns named by the task) and one flat row per method."""
    scores = next((r["score_names"] for r in record["methods"] if r["status"] == "ok"), [])
    names = [c for c in COLUMNS if " / " not in c]
    at = names.index("eval_examples_per_second")
    names[at:at] = [c for k in scores for c in (k, f"{k}_95ci")] + (["eval_n"] if scores else [])
    rows = []
    for r in record["methods"]:
        parts = r.get("breakdown_mib", {})
        flat = {k: r.get(k) for k in names}
        flat.update(zip(("live_activations_mib", "allocator_overhead_mib"), split_activations(r) or (None, None)))
        for k in scores:
            ci = (r.get("intervals") or {}).get(k)
            flat[f"{k}_95ci"] = f"[{ci['low']:.1f}, {ci['high']:.1f}]" if ci else None
        flat["weights_mib"] = sum(v for k, v in parts.items() if k.startswith("weights")) if parts else None
        for column, part in _PARTS.items():
            flat[column] = parts.get(part)
        rows.append(flat)
    return names, rows


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # per-rank figures
        return " / ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return str(value)


def write_reports(record: dict[str, Any], out: Path) -> None:
    """bench.json, bench.csv, bench.md, bench_memory.png and bench_tradeoff.png in `out`."""
    (out / "bench.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    names, rows = table_rows(record)
    with open(out / "bench.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.md").write_text(markdown(record, names, rows), encoding="utf-8")
    plot_memory(record, out / "bench_memory.png")
    plot_tradeoff(record, out / "bench_tradeoff.png")


def markdown(record: dict[str, Any], names: list[str], rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the bench, with the machine and the weights' make-up under it."""
    env = record["environment"]
    machine = env.get("gpu", {}).get("name") or f"{env['cpu']} ({env['logical_cores']} logical cores)"
    shown = [n for n in names if n != "error"]
    lines = [f"# lite-ft bench: {record['recipe']}, {record['steps']} steps", "",
             f"Machine: {machine}, {env['ram_gib']} GiB RAM; torch {env['versions'].get('torch')}, "
             f"transformers {env['versions'].get('transformers')}, peft {env['versions'].get('peft')}, "
             f"bitsandbytes {env['versions'].get('bitsandbytes')}.", "",
             "| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
    lines += ["| " + " | ".join(_fmt(row[n]) for n in shown) + " |" for row in rows]
    lines.append("")
    for r in record["methods"]:
        if r["status"] != "ok":
            lines.append(f"- {r['method']} failed: {r['error']}")
            continue
        weights = {k[len("weights ("):-1]: v for k, v in r["breakdown_mib"].items()
                   if k.startswith("weights") and v >= 0.05}  # not position-id buffers and the like
        if weights:
            lines.append(f"- {r['method']} frozen weights: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in weights.items()))
    lines += differences_table(record.get("differences", []))
    lines += ["", f"Command: `{record['command']}`", ""]
    return "\n".join(lines)


def differences_table(found: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: each pair of methods' paired difference per score, marked within noise when its 95%
    interval contains 0."""
    if not found:
        return []
    lines = ["", "Differences between methods (A - B on the same eval examples; paired bootstrap, 95%):", "",
             "| A - B | score | difference | 95% interval | n | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for d in found:
        verdict = "within noise" if d["within_noise"] else "beyond noise"
        lines.append(f"| {d['a']} - {d['b']} | {d['score']} | {d['difference']:+.2f} | "
                     f"[{d['low']:+.2f}, {d['high']:+.2f}] | {d['n']} | {verdict} |")
    return lines


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_memory(record: dict[str, Any], path: Path) -> None:
    """Stacked bars: each method's training peak by part; a tick marks the whole-run peak when it is higher."""
    plt = _pyplot()
    ok = [r for r in record["methods"] if r["status"] == "ok" and r["breakdown_mib"]]
    for r in ok:
        r["chart_mib"] = dict(r["breakdown_mib"])
        split = split_activations(r)
        if split:  # the measured rest, cut into the replayed live tensors and what the allocator holds beyond them
            del r["chart_mib"][ACTIVATIONS]
            r["chart_mib"].update({LIVE: split[0], OVERHEAD: split[1]})
    order = ["runtime", "weights", "trainable parameters", "gradients", "optimizer state", "activations", "allocator"]
    parts = sorted(dict.fromkeys(k for r in ok for k in r["chart_mib"]),
                   key=lambda k: next(i for i, p in enumerate(order + [k]) if k.startswith(p)))
    fig, ax = plt.subplots(figsize=(1.6 * max(len(record["methods"]), 2) + 3, 4.5))
    names = [r["method"] for r in record["methods"]]
    bottoms = [0.0] * len(names)
    for part in parts:
        heights = [r.get("chart_mib", {}).get(part, 0.0) if r["status"] == "ok" else 0.0
                   for r in record["methods"]]
        ax.bar(names, heights, bottom=bottoms, label=part)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for i, r in enumerate(record["methods"]):
        if r["status"] != "ok":
            ax.text(i, 0, "failed", ha="center", va="bottom", color="red")
        elif r["peak_memory_mib"] > bottoms[i] * 1.01:
            ax.plot([i - 0.4, i + 0.4], [r["peak_memory_mib"]] * 2, color="black", linestyle="--")
            ax.text(i, r["peak_memory_mib"], f"peak ({r['peak_phase']})", ha="center", va="bottom", fontsize=8)
    unit = "process RSS" if ok and ok[0]["memory_source"] == "process_rss" else "CUDA allocator"
    ax.set_ylabel(f"MiB ({unit})")
    ax.set_title("Training peak memory by part")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ACTIVATIONS = "activations and workspace"
LIVE = "activations and workspace (live tensors, replayed)"
OVERHEAD = "allocator overhead (resident beyond the live tensors)"


def split_activations(row: dict[str, Any]) -> tuple[float, float] | None:
    """The measured 'activations and workspace' part as (live tensors, allocator overhead), MiB: live from the
    plan's replay of the run's longest micro-batch (train.memory_check records it), the overhead the rest. None
    without both figures."""
    measured = (row.get("breakdown_mib") or {}).get(ACTIVATIONS)
    live = row.get("live_transient_mib")
    if measured is None or live is None:
        return None
    live = min(live, measured)
    return live, measured - live


def plot_tradeoff(record: dict[str, Any], path: Path) -> None:
    """Peak memory against the task's main score (F1 or macro F1), one labelled point per method."""
    plt = _pyplot()
    ok = [r for r in record["methods"] if r["status"] == "ok" and r.get(r["score_names"][-1]) is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if ok:
        score = ok[0]["score_names"][-1]
        for r in ok:
            ax.scatter(r["peak_memory_mib"], r[score], s=60)
            ax.annotate(r["method"], (r["peak_memory_mib"], r[score]), textcoords="offset points", xytext=(6, 4))
        ax.set_ylabel(score)
    else:
        ax.text(0.5, 0.5, "no method was evaluated", ha="center", transform=ax.transAxes)
    ax.set_xlabel("peak memory, MiB")
    ax.set_title("Memory vs score")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
