"""Turn the raw results of benchmarks/speed.py into figures with one definition for every run, a Markdown report
and a loss plot. Pure functions of the raw JSON: `python benchmarks/report.py RESULTS.json` redoes the report.

Definitions (the same for lite-ft and TRL):
- step seconds: end of the previous optimizer step to end of this one (step 1: from the start of training);
- real tokens: non-padding tokens of the step's batch (lite-ft's batch order, identical for every run);
- steady tokens/s: real tokens of steps 2..N over their seconds (step 1 is warm-up); "all" includes step 1;
- MFU: model FLOPs per real token (counted, see flops.py) x steady tokens/s / the measured matmul peak of the
  run's compute dtype (fp32, or bf16 where the weights or autocast are bf16: AMX CPUs multiply bf16 ~7x faster).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

RUN_LABELS = {"lite-ft-lora": "lite-ft LoRA", "lite-ft-qlora": "lite-ft QLoRA", "lite-ft-full": "lite-ft full",
              "lite-ft-lora-bf16": "lite-ft LoRA, model.dtype=bfloat16",
              "lite-ft-qlora-bf16": "lite-ft QLoRA, model.dtype=bfloat16",
              "trl-lora": "TRL SFTTrainer + PEFT LoRA (as lite-ft)",
              "trl-autocast": "TRL + PEFT LoRA, fp32 weights, bf16 autocast",
              "trl-gc": "TRL + PEFT LoRA, gradient checkpointing (TRL's default)"}
TRL_RUNS = ("trl-lora", "trl-autocast", "trl-gc")
TRL_NO_CHECKPOINTING = ("trl-lora", "trl-autocast")  # the TRL runs issue #16's ratios are taken against
NOT_TRAINING = ("evaluation", "save")  # lite-ft memory phases left out of the training peak


def rates(seconds: list[float], tokens: list[int]) -> dict[str, float]:
    """Tokens/s over all steps and over steps 2..N, seconds per step, and step 1's seconds."""
    nan = float("nan")
    rest_s, rest_t = sum(seconds[1:]), sum(tokens[1:len(seconds)])
    return {"tok_s_steady": rest_t / rest_s if rest_s else nan,
            "tok_s_all": sum(tokens[:len(seconds)]) / sum(seconds) if seconds else nan,
            "s_per_step_steady": rest_s / (len(seconds) - 1) if len(seconds) > 1 else nan,
            "step1_s": seconds[0] if seconds else nan}


def lite_ft_row(raw: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    """Figures of one `lite-ft run` from its metrics.json, train_log.jsonl (one entry per step) and memory.json."""
    log = sorted(raw["log"], key=lambda e: e["step"])
    elapsed = [e["elapsed_s"] for e in log]
    seconds = [b - a for a, b in zip([0.0, *elapsed], elapsed)]
    implied = [e["tokens_per_second"] * s for e, s in zip(log, seconds)]  # lite-ft's own count, for a cross-check
    phases = raw["memory"]["phases"]
    training = {k: v for k, v in phases.items() if k not in NOT_TRAINING}
    peak_phase = max(training, key=lambda k: training[k]["peak_mib"])
    train, evaluation = raw["metrics"]["train"], raw["metrics"].get("eval", {})
    eval_s = _eval_seconds(raw["metrics"])
    row = {"losses": [e["loss"] for e in log], "seconds": seconds, "tokens": tokens[:len(log)],
           "tokens_max_rel_diff": max((abs(i - t) / t for i, t in zip(implied, tokens)), default=float("nan")),
           "peak_mib": training[peak_phase]["peak_mib"], "peak_phase": peak_phase,
           "peak_mib_with_eval": raw["memory"]["peak_mib"], "tok_s_lite_ft_metric": train["tokens_per_second"],
           "trainable_params": train["trainable_params"], "total_params": train["total_params"],
           "eval_n": evaluation.get("n"), "eval_seconds": eval_s,
           "eval_ex_s": evaluation["n"] / eval_s if eval_s and evaluation.get("n") else None,
           "eval_scores": {k: v for k, v in evaluation.items() if k in ("exact_match", "f1")},
           "compute": train.get("precision", {}).get("compute", "float32"),
           "wall_s": raw["wall_s"], "foreign_cores": raw.get("foreign_cores")}
    row.update(rates(seconds, tokens))
    return row


def _eval_seconds(metrics: dict[str, Any]) -> float | None:
    """Generation-eval seconds if the run recorded them (metrics.json `eval.seconds`; older runs have none)."""
    evaluation = metrics.get("eval", {})
    value = evaluation.get("seconds")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def trl_row(raw: dict[str, Any]) -> dict[str, Any]:
    """Figures of the TRL reference from its own JSON (trl_reference.py)."""
    seconds, tokens = raw["step_seconds"], raw["step_tokens"]
    logged = raw["trl_logged_tokens"]
    trl_count = [b - a for a, b in zip([0.0, *logged], logged)]  # TRL's cumulative attention-mask count
    config = raw.get("config", {})
    bf16 = config.get("bf16_autocast") or "bfloat16" in str(config.get("weights_dtype"))
    row = {"losses": raw["losses"], "seconds": seconds, "tokens": tokens, "peak_mib": raw["peak_rss_mib"],
           "compute": "bfloat16" if bf16 else "float32",
           "peak_phase": "whole process", "trainable_params": raw["trainable_params"], "total_params": None,
           "tokens_max_rel_diff": max((abs(c - t) / t for c, t in zip(trl_count, tokens)), default=float("nan")),
           "eval_ex_s": None, "wall_s": raw["wall_s"], "foreign_cores": raw.get("foreign_cores")}
    row.update(rates(seconds, tokens))
    return row


def matmul_peaks(raw: dict[str, Any]) -> dict[str, float]:
    """GFLOP/s by dtype: the higher of the measurements before and after the runs (a burst of other work during one
    cannot inflate MFU); bf16 only where flops.py measured it (CPUs that compute it in hardware)."""
    peaks = {}
    for dtype, key in (("float32", "matmul_peak"), ("bfloat16", "matmul_peak_bf16")):
        found = [m["gflops"] for m in (raw["flops"].get(key), raw.get(key + "_end")) if m]
        if found:
            peaks[dtype] = max(found)
    return peaks


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Rows per run, MFU, ratios against TRL and LoRA, and the loss comparison of lite-ft LoRA with TRL."""
    flops = raw["flops"]
    peaks = matmul_peaks(raw)
    rows: dict[str, dict[str, Any]] = {}
    for name in RUN_LABELS:
        if name in TRL_RUNS and name in raw:
            rows[name] = trl_row(raw[name])
        elif name in raw:
            rows[name] = lite_ft_row(raw[name], flops["step_tokens"])
    for name, row in rows.items():
        per_token = flops["full" if name.endswith("full") else "lora"]["flops_per_token"]
        row["gflop_per_token"] = per_token / 1e9
        peak = peaks.get(row["compute"])
        row["mfu_pct"] = 100 * per_token * row["tok_s_steady"] / (peak * 1e9) if peak else None
    trl = rows.get("trl-lora")
    for row in rows.values():
        row["tok_s_vs_trl"] = row["tok_s_steady"] / trl["tok_s_steady"] if trl else None
        row["mem_vs_trl"] = row["peak_mib"] / trl["peak_mib"] if trl else None
    summary: dict[str, Any] = {"rows": rows, "matmul_peak_gflops": peaks["float32"], "matmul_peaks": peaks,
                               "flops_foreign_cores": flops.get("foreign_cores")}
    if "lite-ft-lora" in rows and "lite-ft-qlora" in rows:
        summary["qlora_vs_lora_tok_s"] = rows["lite-ft-qlora"]["tok_s_steady"] / rows["lite-ft-lora"]["tok_s_steady"]
    if trl and "lite-ft-lora" in rows:
        summary["loss"] = compare_losses(rows["lite-ft-lora"]["losses"], trl["losses"])
        summary["same_lora_init"] = raw["trl-lora"]["adapter_fingerprint"] == flops["lora"]["adapter_fingerprint"]
        summary["same_batches"] = raw["trl-lora"]["batches_identical_to_lite_ft"]
    return summary


def compare_losses(ours: list[float], theirs: list[float]) -> dict[str, Any]:
    n = min(len(ours), len(theirs))
    diffs = [abs(a - b) for a, b in zip(ours[:n], theirs[:n])]
    return {"steps": n, "lite_ft": ours[:n], "trl": theirs[:n], "max_abs_diff": max(diffs, default=float("nan")),
            "step1_abs_diff": diffs[0] if diffs else float("nan"),
            "max_rel_diff": max((d / abs(b) for d, b in zip(diffs, theirs) if b), default=float("nan"))}


def _fmt(value: Any, spec: str = ".1f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def main_table(summary: dict[str, Any]) -> list[str]:
    """One row per run: speed, memory, loss, MFU, ratios."""
    header = ("| run | real tok/s (steady) | real tok/s (all steps) | s/step (steady) | step 1 s | peak RSS MiB | "
              "mean loss | final loss | GFLOP/token | MFU | tok/s vs TRL | memory vs TRL | eval ex/s |")
    lines = [header, "| --- " + "| ---: " * 12 + "|"]
    for name, row in summary["rows"].items():
        losses = row["losses"]
        lines.append(
            f"| {RUN_LABELS[name]} | {_fmt(row['tok_s_steady'])} | {_fmt(row['tok_s_all'])} | "
            f"{_fmt(row['s_per_step_steady'], '.2f')} | {_fmt(row['step1_s'], '.2f')} | "
            f"{_fmt(row['peak_mib'], ',.0f')} | "
            f"{_fmt(sum(losses) / len(losses) if losses else None, '.4f')} | "
            f"{_fmt(losses[-1] if losses else None, '.4f')} | {_fmt(row['gflop_per_token'], '.3f')} | "
            f"{_fmt(row['mfu_pct'], '.1f', '%')} | {_fmt(row['tok_s_vs_trl'], '.2f', 'x')} | "
            f"{_fmt(row['mem_vs_trl'], '.2f', 'x')} | {_fmt(row['eval_ex_s'], '.2f')} |")
    return lines


def lora_criteria(label: str, lora: dict[str, Any], rows: dict[str, dict[str, Any]], verdict: Any) -> list[str]:
    """The targets against TRL for one lite-ft LoRA row."""
    lines: list[str] = []
    no_gc = [rows[n] for n in TRL_NO_CHECKPOINTING if n in rows]
    if no_gc:  # against the fastest TRL without checkpointing, and the smallest one
        fastest, smallest = max(t["tok_s_steady"] for t in no_gc), min(t["peak_mib"] for t in no_gc)
        lines.append(f"- {label} real tokens/s vs the fastest TRL without gradient checkpointing: "
                     f"{lora['tok_s_steady'] / fastest:.2f}x (target >= 2.5x): "
                     f"{verdict(lora['tok_s_steady'] / fastest >= 2.5)}")
        lines.append(f"- {label} peak RSS vs the smallest TRL without gradient checkpointing: "
                     f"{lora['peak_mib'] / smallest:.2f}x (target <= 0.6x): {verdict(lora['peak_mib'] / smallest <= 0.6)}")
    if "trl-gc" in rows:
        gc = rows["trl-gc"]
        lines.append(f"- {label} vs TRL with gradient checkpointing (its default): "
                     f"{lora['tok_s_steady'] / gc['tok_s_steady']:.2f}x the tokens/s at "
                     f"{lora['peak_mib'] / gc['peak_mib']:.2f}x the peak RSS (target: below it): "
                     f"{verdict(lora['peak_mib'] < gc['peak_mib'])}")
    if lora.get("mfu_pct") is not None:
        lines.append(f"- {label} MFU ({lora['compute']} peak): {lora['mfu_pct']:.1f}% (target >= 60%): "
                     f"{verdict(lora['mfu_pct'] >= 60)}")
    return lines


def criteria(summary: dict[str, Any]) -> list[str]:
    """The targets of issue #16, each with the measured value and whether it is met."""
    rows, lines = summary["rows"], []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    for name in ("lite-ft-lora", "lite-ft-lora-bf16"):
        if name in rows:
            lines += lora_criteria(RUN_LABELS[name], rows[name], rows, verdict)
    lora, qlora = rows.get("lite-ft-lora"), rows.get("lite-ft-qlora")
    if lora and qlora:
        lines.append(f"- QLoRA peak RSS vs LoRA: {qlora['peak_mib']:,.0f} vs {lora['peak_mib']:,.0f} MiB "
                     f"(target: lower): {verdict(qlora['peak_mib'] < lora['peak_mib'])}")
    if "loss" in summary:
        loss = summary["loss"]
        lines.append(f"- loss curves over {loss['steps']} steps: max |lite-ft - TRL| {loss['max_abs_diff']:.2e} "
                     f"(relative {loss['max_rel_diff']:.2e}); step 1: {loss['lite_ft'][0]:.6f} vs "
                     f"{loss['trl'][0]:.6f} (diff {loss['step1_abs_diff']:.2e})")
        lines.append(f"- same batches (TRL's dataloader vs lite-ft's collated batches): {summary['same_batches']}; "
                     f"same LoRA initialisation (fingerprint): {summary['same_lora_init']}")
    if "qlora_vs_lora_tok_s" in summary:
        ratio = summary["qlora_vs_lora_tok_s"]
        lines.append(f"- QLoRA real tokens/s vs LoRA: {ratio:.2f}x (target >= 0.9x): {verdict(ratio >= 0.9)}")
    return lines


def loss_table(summary: dict[str, Any]) -> list[str]:
    """lite-ft LoRA and TRL loss side by side, step by step."""
    loss = summary.get("loss")
    if not loss:
        return []
    lines = ["| step | lite-ft LoRA loss | TRL loss | abs diff |", "| ---: | ---: | ---: | ---: |"]
    for step, (ours, theirs) in enumerate(zip(loss["lite_ft"], loss["trl"]), start=1):
        lines.append(f"| {step} | {ours:.6f} | {theirs:.6f} | {abs(ours - theirs):.2e} |")
    return lines


def run_notes(summary: dict[str, Any]) -> list[str]:
    """Per run: parameters, wall time, others' CPU use, token-count cross-check, peak phase, eval."""
    lines = []
    for name, row in summary["rows"].items():
        params = f"{row['trainable_params']:,} trainable" + (f" of {row['total_params']:,}" if row["total_params"]
                                                              else "")
        foreign = _fmt(row.get("foreign_cores"), ".2f", " cores")
        evaluation = ""
        if row.get("eval_n"):
            scores = ", ".join(f"{k} {v:.1f}" for k, v in row["eval_scores"].items())
            speed = _fmt(row["eval_ex_s"], ".2f", " examples/s") if row["eval_ex_s"] else "time not recorded"
            evaluation = f"; eval {row['eval_n']} examples by generation ({scores}), {speed}"
        lines.append(f"- {RUN_LABELS[name]}: {params} parameters; process wall {row['wall_s']:.0f} s; other "
                     f"processes' CPU use during it {foreign}; peak RSS in {row['peak_phase']}; step-token count "
                     f"cross-check max relative diff {_fmt(row['tokens_max_rel_diff'], '.1e')}{evaluation}")
    return lines


def load_warning(summary: dict[str, Any]) -> list[str]:
    """A warning at the top when other processes used the CPU during any run: then no speed figure holds."""
    busy = max((row.get("foreign_cores") or 0.0 for row in summary["rows"].values()), default=0.0)
    busy = max(busy, summary.get("flops_foreign_cores") or 0.0)
    if busy <= 0.1:
        return []
    warning = (f"**Warning: other processes kept up to {busy:.2f} cores busy during these runs; the speed, MFU "
               "and ratio figures below are distorted. Rerun on an idle machine.**")
    return [warning, ""]


def _peak_details(machine: dict[str, Any]) -> str:
    parts = []
    for when, m in machine.get("matmul_measurements", {}).items():
        sizes = ", ".join(f"n={n}: {g:.1f}" for n, g in m["gflops_by_size"].items())
        parts.append(f"{when} of the benchmark: {sizes}; other processes {m['foreign_cores']:.2f} cores")
    return "; ".join(parts)


def machine_lines(machine: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    cpu = (f"- CPU: {machine['cpu']}, {machine['cores']} logical cores, torch threads {machine['torch_threads']}, "
           f"RAM {machine['ram_gib']:.1f} GiB, no GPU used")
    peak = (f"- fp32 matmul peak (torch.mm, best of 5, the higher of two measurements): "
            f"{machine['matmul_peak_gflops']:.1f} GFLOP/s ({_peak_details(machine)})")
    if machine.get("matmul_peak_bf16_gflops"):
        peak += f"; bf16 matmul peak {machine['matmul_peak_bf16_gflops']:.1f} GFLOP/s (AMX / AVX512-BF16)"
    return [cpu, peak, f"- {machine['platform']}, Python {machine['python']}", f"- {versions}",
            f"- date {machine['date']}; load average before the runs {machine['load_before']}"]


def markdown(results: dict[str, Any]) -> str:
    """The whole report: command, machine, main table, criteria, loss comparison, notes."""
    summary = results["summary"]
    command = (f"Command: `{results['command']}` ({results['steps']} steps per run, runs one after another; "
               f"total {results['total_seconds'] / 60:.1f} min)")
    parts = ["# lite-ft vs TRL: training speed, memory and MFU on this CPU", "", *load_warning(summary), command,
             "", "## Machine", "", *machine_lines(results["machine"]),
             "", "## Results", "", *main_table(summary),
             "", "## Targets of issue #16", "", *criteria(summary),
             "", "## Loss per step, same batches", "", *loss_table(summary),
             "", "## Runs", "", *run_notes(summary),
             "", "## How it is measured", "", *NOTES]
    return "\n".join(parts) + "\n"


NOTES = [
    ("- Every run: SmolLM2-135M-Instruct in fp32, SQuAD prompts (lite-ft's QA task), batch 8, max length 384, "
     "loss on the answer tokens only, the same batches in the same order (lite-ft's length-grouped epoch order); "
     "LoRA r 16, alpha 32, dropout 0 on all linear layers; lr 3e-4 cosine (full: lr from recipes/qa-full.yaml). "
     "Each run is its own process, one at a time."),
    ("- Real tokens are non-padding tokens. Step seconds run from the end of one optimizer step to the end of the "
     "next (data loading, logging and the optimizer included); steady figures leave out step 1."),
    ("- Peak RSS: the process's resident memory sampled every 5 ms (lite-ft: its memory.json phases from model "
     "load to the last step, evaluation left out; TRL: the whole process, load and dataset preparation included)."),
    ("- MFU: model FLOPs per real token, counted with torch.utils.flop_counter.FlopCounterMode over one forward + "
     "backward of lite-ft's loss on one unpadded example, through peft's own LoRA layers and PyTorch's SDPA (LoRA: "
     "frozen base, so no weight gradients for it; full: all of them), times steady tokens/s, over the matmul peak "
     "of the run's dtype (measured before and after the runs, the higher one). QLoRA and TRL use the LoRA "
     "figure: QLoRA's dequantization and TRL's LM head over prompt positions are overhead, not model work."),
    ("- TRL: SFTTrainer with a pre-tokenized dataset (input_ids + completion_mask, completion_only_loss=True), a "
     "sequential sampler over a dataset laid out in lite-ft's batch order, its default optimizer (fused AdamW; "
     "lite-ft uses torch.optim.AdamW); as lite-ft: weights in the dtype lite-ft picks, no autocast, no gradient "
     "checkpointing; the autocast run: fp32 weights with bf16=True, as the transformers docs advise on AMX CPUs; the "
     "checkpointing run: gradient_checkpointing=True, TRL's default."),
]


def plot_losses(summary: dict[str, Any], path: Path) -> bool:
    """Loss per step of every run; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, row in summary["rows"].items():
        steps = range(1, len(row["losses"]) + 1)
        ax.plot(steps, row["losses"], marker="o", linestyle="--" if name in TRL_RUNS else "-",
                label=RUN_LABELS[name])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("Same batches: lite-ft vs TRL SFTTrainer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], json_path: Path) -> list[Path]:
    """Summarize the raw results and write NAME.json, NAME.md and NAME-loss.png beside each other."""
    results["summary"] = summarize(results["raw"])
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(results), encoding="utf-8")
    written = [json_path, md_path]
    png = json_path.with_name(json_path.stem + "-loss.png")
    if plot_losses(results["summary"], png):
        written.append(png)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/report.py RESULTS.json")
    for written in write_report(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")), Path(sys.argv[1])):
        print(written)
