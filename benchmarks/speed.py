"""lite-ft vs TRL SFTTrainer + PEFT in one invocation: real tokens/s, peak memory, loss curves, MFU (issue #6).

One process at a time, never two (they would share the cores): the matmul peak and model FLOPs (flops.py), then
`lite-ft run` with LoRA, QLoRA and full fine-tuning on SQuAD (recipes/squad-lora.yaml plus overrides), then the TRL
reference on the same batches (trl_reference.py), then the matmul peak once more. Writes NAME.json (raw and
summarized), NAME.md (the tables, the machine, the command) and NAME-loss.png to --out; progress goes to stderr,
each process's output to --work.

    python benchmarks/speed.py                 # 12 steps per run; about 25 minutes on 2 idle cores
    python benchmarks/speed.py --steps 2       # end-to-end check, about 10 minutes
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_common import REPO, default_data_dir, run_overrides, versions
from report import matmul_peaks, write_report

HERE = Path(__file__).resolve().parent
RUNS = ("lora", "qlora", "full", "lora-bf16", "qlora-bf16", "trl", "trl-autocast", "trl-gc")
BF16 = ["model.dtype=bfloat16"]  # the -bf16 runs: for CPUs that compute bf16 in hardware (AMX / AVX512-BF16)
TRL_FLAGS = {"trl": [], "trl-autocast": ["--autocast"], "trl-gc": ["--gradient-checkpointing"]}


def log(message: str) -> None:
    print(f"[speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_seconds() -> tuple[float, float]:
    """Busy CPU seconds of the whole machine (all cores, from /proc/stat), and of this process plus its finished
    children; their difference over a run is the work of other processes, however short-lived."""
    import resource

    import psutil

    machine = psutil.cpu_times()
    busy = sum(getattr(machine, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq"))
    ours = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return busy, ours


def run_child(name: str, argv: list[str], work: Path) -> dict[str, float]:
    """Run one benchmark process to completion, its output in WORK/NAME.log; its wall seconds, and the cores that
    other processes kept busy meanwhile (0 on an idle machine; the figures are only trustworthy then)."""
    log_path = work / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; no stray Hub requests inside the timings
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    (busy0, ours0), started = cpu_seconds(), time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as out:
        code = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - started
    busy1, ours1 = cpu_seconds()
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
        raise SystemExit(f"{name} failed (exit {code}); last lines of {log_path}:\n{tail}")
    return {"wall_s": wall, "foreign_cores": max(busy1 - busy0 - (ours1 - ours0), 0.0) / wall}


def run_flops(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / "flops.json"
    overrides = run_overrides("lora", args.steps, args.data_dir, args.eval_examples, work / "unused")
    argv = [sys.executable, str(HERE / "flops.py"), "--steps", str(args.steps), "--out", str(out),
            *(f"--override={o}" for o in overrides)]
    timing = run_child("flops", argv, work)
    return {**json.loads(out.read_text(encoding="utf-8")), **timing}


def run_peak(work: Path) -> dict[str, Any]:
    """The matmul peaks measured again after the runs, as matmul_peak_end (fp32) and matmul_peak_bf16_end: the
    higher of the two measurements is used, so a burst of other work during one cannot inflate MFU."""
    out = work / "matmul-peak-end.json"
    timing = run_child("matmul-peak-end", [sys.executable, str(HERE / "flops.py"), "--peak-only", "--out", str(out)],
                       work)
    found = json.loads(out.read_text(encoding="utf-8"))
    return {f"{key}_end": {**value, **timing} for key, value in found.items()}


def run_lite_ft(method: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`lite-ft run` in its own process; its metrics.json, train_log.jsonl and memory.json."""
    run_dir = work / f"lite-ft-{method}"
    base, _, dtype = method.partition("-")
    overrides = run_overrides(base, args.steps, args.data_dir, args.eval_examples, run_dir) + (BF16 if dtype else [])
    argv = [sys.executable, "-m", "lite_ft", "run", str(REPO / "recipes" / "squad-lora.yaml"), *overrides,
            "--overwrite"]
    timing = run_child(f"lite-ft-{method}", argv, work)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    metrics.pop("data", None)  # per-reason skip samples: long and not needed here
    train_log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    memory = json.loads((run_dir / "memory.json").read_text(encoding="utf-8"))
    return {"metrics": metrics, "log": train_log, "memory": memory, "command": shlex.join(argv[1:]), **timing}


def run_trl(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    key = "trl-lora" if name == "trl" else name
    out = work / f"{key}.json"
    overrides = run_overrides("lora", args.steps, args.data_dir, args.eval_examples, work / "unused")
    argv = [sys.executable, str(HERE / "trl_reference.py"), "--out", str(out), *TRL_FLAGS[name],
            *(f"--override={o}" for o in overrides)]
    timing = run_child(key, argv, work)
    return {**json.loads(out.read_text(encoding="utf-8")), **timing}


def describe_machine(raw: dict[str, Any]) -> dict[str, Any]:
    """CPU model, cores, RAM, library versions, the matmul peak measurements: what the figures depend on."""
    import psutil

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    start = {**raw["flops"]["matmul_peak"], "foreign_cores": raw["flops"]["foreign_cores"]}
    measured = [("start", start), ("end", raw["matmul_peak_end"])]
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": start["threads"],
            "ram_gib": psutil.virtual_memory().total / 2**30, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions(),
            "matmul_peak_gflops": max(m["gflops"] for _, m in measured),
            "matmul_peak_bf16_gflops": matmul_peaks(raw).get("bfloat16"),
            "matmul_measurements": {when: {k: m[k] for k in ("gflops_by_size", "foreign_cores")}
                                    for when, m in measured},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (step 1 counts as warm-up)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for NAME.json/.md/-loss.png")
    parser.add_argument("--name", default="speed-cpu", help="file name stem of the results")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "bench-speed",
                        help="run folders and per-process logs")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(),
                        help="folder with squad_train.jsonl and squad_validation.jsonl")
    parser.add_argument("--eval-examples", type=int, default=25,
                        help="SQuAD validation questions each lite-ft run answers by generation (one eval batch)")
    parser.add_argument("--runs", default=None, help=f"comma-separated subset of {','.join(RUNS)} (default: all; "
                        "the -bf16 ones only on CPUs that compute bf16 in hardware)")
    args = parser.parse_args()
    if args.runs is None:
        from lite_ft.recipe.precision import cpu_computes_bf16

        args.runs = ",".join(r for r in RUNS if cpu_computes_bf16() or not r.endswith("-bf16"))
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown or args.steps < 2:
        parser.error(f"unknown runs {unknown}" if unknown else "--steps must be at least 2 (step 1 is warm-up)")
    for name in ("squad_train.jsonl", "squad_validation.jsonl"):
        if not (args.data_dir / name).is_file():
            parser.error(f"{args.data_dir / name} not found; pass --data-dir or set LITE_FT_SHARED_DATA")
    args.data_dir = args.data_dir.resolve()
    return args


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.perf_counter(), " ".join(f"{x:.2f}" for x in os.getloadavg())
    if os.getloadavg()[0] > 0.5:
        log(f"warning: load average {load_before} before starting; other work on the CPU distorts every figure")
    log("matmul peak and model FLOPs per token (flops.py) ...")
    raw: dict[str, Any] = {"flops": run_flops(args, args.work)}
    log(f"  peak {raw['flops']['matmul_peak']['gflops']:.1f} GFLOP/s ({raw['flops']['wall_s']:.0f} s)")
    for name in args.runs:
        trl = name in TRL_FLAGS
        key = ("trl-lora" if name == "trl" else name) if trl else f"lite-ft-{name}"
        log(f"{key}: {args.steps} steps ...")
        raw[key] = run_trl(name, args, args.work) if trl else run_lite_ft(name, args, args.work)
        foreign = raw[key]["foreign_cores"]
        note = f", other processes used {foreign:.2f} cores meanwhile" if foreign > 0.1 else ""
        log(f"  done in {raw[key]['wall_s']:.0f} s{note}")
    raw.update(run_peak(args.work))
    log(f"matmul peak again: {raw['matmul_peak_end']['gflops']:.1f} GFLOP/s")
    command = shlex.join(["python", os.path.relpath(__file__, REPO), *sys.argv[1:]])
    results = {"command": command, "steps": args.steps, "total_seconds": time.perf_counter() - started,
               "machine": {**describe_machine(raw), "load_before": load_before}, "raw": raw}
    written = write_report(results, args.out / f"{args.name}.json")
    print(written[1].read_text(encoding="utf-8"))
    log("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
