"""Several runs of benchmarks/speed.py side by side: each row's tokens/s, peak RSS and MFU per run, their mean,
and the issue #16 ratios of the means. One speed.py run moves by 10-20% on a shared VM; the targets are read here.

Run: python benchmarks/speed_summary.py results/speed-A.json results/speed-B.json ... [--out results/NAME.md]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from report import TRL_NO_CHECKPOINTING

LITE_FT, LITE_FT_BF16 = "lite-ft-lora", "lite-ft-lora-bf16"


def load(paths: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    """(file stem, summary rows) of each speed.py JSON."""
    return [(p.stem, json.loads(p.read_text(encoding="utf-8"))["summary"]["rows"]) for p in paths]


def _trl_fastest(rows: dict[str, Any]) -> float | None:
    """The faster TRL run without gradient checkpointing, as report.lora_criteria takes it."""
    speeds = [rows[name]["tok_s_steady"] for name in TRL_NO_CHECKPOINTING if name in rows]
    return max(speeds) if speeds else None


def table(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """A markdown table: one line per row name, one column group per run, then the mean."""
    names = list(dict.fromkeys(name for _, rows in runs for name in rows))
    head = "| row | " + " | ".join(stem for stem, _ in runs) + " | mean tok/s | mean peak MiB | mean MFU |"
    lines = [head, "| --- |" + " ---: |" * (len(runs) + 3)]
    for name in names:
        got = [rows.get(name) for _, rows in runs]
        cells = [f"{r['tok_s_steady']:.1f} / {r['peak_mib']:,.0f} / {r['mfu_pct']:.1f}%" if r else "" for r in got]
        have = [r for r in got if r]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(r['tok_s_steady'] for r in have):.1f}"
                     f" | {statistics.mean(r['peak_mib'] for r in have):,.0f}"
                     f" | {statistics.mean(r['mfu_pct'] for r in have):.1f}% |")
    return lines


def ratios(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """lite-ft LoRA (fp32 and bf16) against TRL's fastest without checkpointing: per run and of the means."""
    out = []
    for ours in (LITE_FT, LITE_FT_BF16):
        pairs = [(rows[ours]["tok_s_steady"], _trl_fastest(rows)) for _, rows in runs if ours in rows]
        pairs = [(a, b) for a, b in pairs if b]
        if not pairs:
            continue
        per_run = ", ".join(f"{a / b:.2f}x" for a, b in pairs)
        mean_ours, mean_trl = statistics.mean(a for a, _ in pairs), statistics.mean(b for _, b in pairs)
        out.append(f"- {ours} vs TRL's fastest without checkpointing: {per_run} per run; means {mean_ours:.1f} vs "
                   f"{mean_trl:.1f} tok/s = **{mean_ours / mean_trl:.2f}x** (target >= 2.5x)")
        mfus = [rows[ours]["mfu_pct"] for _, rows in runs if ours in rows]
        out.append(f"- {ours} MFU: {', '.join(f'{m:.1f}%' for m in mfus)}; mean **{statistics.mean(mfus):.1f}%** "
                   "(target >= 60%)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="speed.py JSON files")
    parser.add_argument("--out", type=Path, default=None, help="also write the summary here (markdown)")
    args = parser.parse_args()
    runs = load(args.runs)
    text = "\n".join(["# speed.py runs side by side", "",
                      "Each cell: real tokens/s (steady) / peak RSS MiB / MFU (over the run's own matmul peak).", "",
                      *table(runs), "", *ratios(runs), ""])
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
