"""Command line: parse, call the library, turn lite-ft's own errors into a clean message and exit code.

Each command imports its library function inside its body: `lite-ft --help` and `lite-ft validate` then start
without loading torch and transformers (seconds on a small machine).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from lite_ft import __version__
from lite_ft.errors import LiteFTError

# lite_ft.export.gguf_export.GGUF_TYPES, spelled out here so that `lite-ft --help` does not import torch.
GGUF_TYPES = ["f32", "f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]


def _clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show a LiteFTError as `error: ...` with its exit code (2 for recipe problems), never as a traceback."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = _terminate_as_exception()
        try:
            return fn(*args, **kwargs)
        except LiteFTError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated (SIGTERM); an unfinished run continues with the same command and --resume", err=True)
            sys.exit(143)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return wrapper


class Terminated(BaseException):  # not an Exception: no `except Exception` may swallow it
    """SIGTERM outside the training steps (which checkpoint first): unwind, so that files are closed cleanly."""


def _terminate_as_exception() -> Any:
    """Turn SIGTERM into Terminated in the main thread; returns the previous handler (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handle(signum: int, frame: Any) -> None:
        raise Terminated

    return signal.signal(signal.SIGTERM, handle)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lite-ft")
def main() -> None:
    """Fine-tune language models (full, LoRA, QLoRA) on a laptop CPU or one consumer GPU."""
    _quiet_libraries()


def _quiet_libraries() -> None:
    """Keep the terminal for lite-ft's own progress bars: no per-tensor loading bars or deprecation chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@main.command("run", context_settings={"ignore_unknown_options": False})
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--resume", is_flag=True, help="Continue the unfinished run in output.dir from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace whatever run output.dir holds.")
@click.option("--allow-data-change", is_flag=True,
              help="With --resume: continue although the training data changed since the checkpoint (recorded).")
@click.option("--nproc", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Processes on this machine (data parallel, like torchrun --nproc_per_node); CPU: gloo, GPU: nccl.")
@_clean_errors
def run_command(recipe: str, overrides: tuple[str, ...], resume: bool, overwrite: bool,
                allow_data_change: bool, nproc: int) -> None:
    """Fine-tune and evaluate as RECIPE says.

    OVERRIDES are section.key=value pairs checked like the file, e.g. train.max_steps=20 lora.r=8
    output.dir=runs/try2. Results land in output.dir: metrics.json, predictions.jsonl, train_log.jsonl,
    memory.json, recipe.yaml and the adapter or weights. An unfinished run of the same recipe in output.dir
    resumes from its last checkpoint; a different run there is refused unless --overwrite. Under torchrun or
    accelerate launch, every process runs this command and rank 0 writes the results.
    """
    from lite_ft.recipe.load import load_recipe

    parsed = load_recipe(recipe, overrides)  # checked once here, before any process starts
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from lite_ft.training.launch import launch

        flags = [f for f, on in (("--resume", resume), ("--overwrite", overwrite),
                                 ("--allow-data-change", allow_data_change)) if on]
        sys.exit(launch(["run", recipe, *overrides, *flags], nproc))
    from lite_ft.run import run, summary

    metrics = run(parsed, resume=resume, overwrite=overwrite, allow_data_change=allow_data_change)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(summary(metrics))
        click.echo(f"results in {parsed.output.dir}/ (metrics.json, predictions.jsonl)")


@main.command("validate")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@_clean_errors
def validate_command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE (and OVERRIDES) without running it; print the resolved recipe."""
    from lite_ft.recipe.load import dump_recipe, load_recipe

    click.echo(dump_recipe(load_recipe(recipe, overrides)), nl=False)


@main.command("models")
def models_command() -> None:
    """List the built-in catalog: models fetched from PyPI wheels, usable offline as model.source."""
    from lite_ft.sources.catalog import CATALOG, cache_dir

    for entry in CATALOG.values():
        click.echo(f"{entry.name:24} {entry.description}")
    click.echo(f"(cached under {cache_dir() / 'models'})")


@main.command("merge")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(), help="Folder to write; a previous export there is replaced.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Weight dtype of a safetensors export.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "gguf"]), default="safetensors", show_default=True)
@click.option("--gguf-type", type=click.Choice(GGUF_TYPES), default="f16", show_default=True,
              help="Tensor type of a GGUF export (norms stay f32); q4_k_m, q5_k_m and q6_k are made by llama.cpp's "
                   "quantizer and need the gguf-check extra.")
@_clean_errors
def merge_command(run_dir: str, out: str, dtype: str, fmt: str, gguf_type: str) -> None:
    """Merge the adapter of RUN_DIR into its base model and export it, verified.

    The base is reloaded unquantized, the adapter merged into it, and the result checked against the model as
    trained (logits on a few eval prompts) before anything appears at --out: a transformers folder (safetensors)
    or a GGUF file with an Ollama Modelfile, plus export.json and a README.md model card.
    """
    from lite_ft.export.merge import merge

    record = merge(run_dir, out, dtype=dtype, fmt=fmt, gguf_type=gguf_type)
    check = record["verification"]["against_unquantized_base"]
    click.echo(f"merged into {out} ({record['format']}, {record['dtype']}): max |logit diff| "
               f"{check['max_abs_diff']:.3g} of scale {check['logit_scale']:.3g}, greedy agreement "
               f"{100 * check['greedy_agreement']:.1f}%")
    quantized = record["verification"].get("against_quantized_base")
    if quantized:
        click.echo(f"against the quantized base it was trained on: max |logit diff| {quantized['max_abs_diff']:.3g}, "
                   f"greedy agreement {100 * quantized['greedy_agreement']:.1f}%")
    if record.get("gguf"):
        click.echo(_gguf_line(record["gguf"]))
    click.echo(f"peak memory {record['peak_rss_mib']:.0f} MiB (process RSS); details in {out}/export.json")


def _gguf_line(g: dict[str, Any]) -> str:
    """How the GGUF file was checked: in llama.cpp, or only read back with transformers."""
    if "llama_cpp" not in g:
        trip = g["roundtrip"]
        return (f"GGUF read back with transformers: max |logit diff| {trip['max_abs_diff']:.3g}, greedy agreement "
                f"{100 * trip['greedy_agreement']:.1f}%; {g['checked_in'].split('; ', 1)[-1]}")
    c = g["llama_cpp"]
    return (f"checked in {c['engine']}: loads without warnings, token ids identical to transformers on "
            f"{c['tokens']['probes']} probes, max |logit diff| {c['max_abs_diff']:.3g} "
            f"({100 * c['relative_max_diff']:.2f}% of scale), top-1 agreement {100 * c['top1_agreement']:.1f}% "
            f"(next token after {c['same_next_token']}/{c['prompts']} eval prompts), perplexity "
            f"{c['positions']['perplexity']['gguf']:.4g} (merged {c['positions']['perplexity']['merged']:.4g})")


@main.command("eval")
@click.argument("target", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="Recipe giving the task and eval data (default: a run folder's own recipe.yaml).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write metrics.json and predictions.jsonl here.")
@click.option("--compare", "other", type=click.Path(), default=None, metavar="B",
              help="Also evaluate B on the same examples and print TARGET - B per score, with its paired bootstrap "
                   "95% interval (within noise when it holds 0).")
@_clean_errors
def eval_command(target: str, overrides: tuple[str, ...], recipe: str | None, out: str | None,
                 other: str | None) -> None:
    """Evaluate TARGET (a model folder, a run folder or a .gguf file) on the recipe's eval data.

    OVERRIDES are section.key=value pairs applied to the recipe, e.g. data.limit_eval=20. Scores come with their
    95% interval over the examples.
    """
    from lite_ft.evaluate import compare, compare_summary, evaluate, summary

    if other is not None:
        if out:
            raise click.UsageError("--out and --compare: write one evaluation's results at a time")
        click.echo(compare_summary(compare(target, other, recipe=recipe, overrides=overrides)))
        return

    metrics = evaluate(target, recipe=recipe, out=out, overrides=overrides)
    click.echo(summary(metrics))
    if out:
        click.echo(f"results in {out}/ (metrics.json, predictions.jsonl)")


def _columns_help() -> str:
    from lite_ft.bench.report import COLUMNS

    return "\b\nColumns of bench.csv / bench.md:\n" + "\n".join(f"  {k:26} {v}" for k, v in COLUMNS.items())


@main.command("bench", epilog=_columns_help())
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--methods", default="full,lora,qlora", show_default=True,
              help="Comma-separated: full, lora, qlora, lora-8bit.")
@click.option("--steps", type=int, default=20, show_default=True, help="Optimizer steps per method.")
@click.option("--eval-limit", type=int, default=None, help="Evaluate on at most this many examples.")
@click.option("--out", default="runs/bench", show_default=True, type=click.Path(file_okay=False),
              help="Folder for bench.json/.csv/.md, the plots, and each method's run folder.")
@click.option("--set", "method_overrides", multiple=True, metavar="METHOD:KEY=VALUE",
              help="An override for one method only, e.g. --set qlora:train.batch_size=4.")
@click.option("--full-lr", type=float, default=None,
              help="Learning rate of full fine-tuning (default: the recipe's train.lr / 10 for a LoRA recipe).")
@click.option("--nproc", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Processes per method (data parallel); the table shows their total tokens/s and each rank's peak.")
@click.option("--plan-only", is_flag=True, help="Train nothing: chart each method's predicted memory by part.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="With --plan-only: the device to plan for.")
@click.option("--gpu-memory", default=None, metavar="SIZE", help="With --plan-only --device cuda: e.g. 24GiB.")
@_clean_errors
def bench_command(recipe: str, overrides: tuple[str, ...], methods: str, steps: int, eval_limit: int | None,
                  out: str, method_overrides: tuple[str, ...], full_lr: float | None, nproc: int, plan_only: bool,
                  device: str, gpu_memory: str | None) -> None:
    """Train RECIPE with each method on the same data, seed and batch shape, each in its own process, and compare
    memory (what the peak is made of), speed, loss and task scores side by side.

    OVERRIDES are section.key=value pairs applied to every method. A method that fails (out of memory, say) is
    reported and the others go on. Writes bench.json (with the machine), bench.csv, bench.md, bench_memory.png
    and bench_tradeoff.png into --out.
    """
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if plan_only:
        from lite_ft.bench.planned import plan_only as planned

        planned(recipe, names, overrides, out, device, gpu_memory)
        click.echo((Path(out) / "bench_plan.md").read_text(encoding="utf-8"))
        click.echo(f"results in {out}/ (bench_plan.json, bench_plan.md, bench_plan_memory.png)")
        return
    from lite_ft.bench.runner import bench, plan

    record = bench(plan(recipe, names, steps, eval_limit, out, overrides, method_overrides, full_lr, nproc))
    click.echo((Path(out) / "bench.md").read_text(encoding="utf-8"))
    failed = [r["method"] for r in record["methods"] if r["status"] != "ok"]
    click.echo(f"results in {out}/ (bench.json, bench.csv, bench.md, bench_memory.png, bench_tradeoff.png)")
    if failed:
        click.echo(f"failed: {', '.join(failed)} (see the logs in {out}/logs/)", err=True)
        sys.exit(1)


@main.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Plan for this device; cuda needs no GPU here (with --gpu-memory).")
@click.option("--gpu-memory", default=None, metavar="SIZE", help="Memory of the CUDA GPU planned for, e.g. 24GiB.")
@click.option("--budget", default=None, metavar="SIZE",
              help="Find the fastest settings that fit SIZE (e.g. 8GiB) and print them as key=value overrides.")
@click.option("--allow-method-change", is_flag=True, help="With --budget: also try qlora and a shorter max_length.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_clean_errors
def plan_command(recipe: str, overrides: tuple[str, ...], device: str, gpu_memory: str | None, budget: str | None,
                 allow_method_change: bool, as_json: bool) -> None:
    """Predict RECIPE's peak memory (by part) and speed before loading any weights; with --budget, fit it.

    model.source may be a folder holding only config.json. The peak is the whole run's: set by the longest
    micro-batch the data and seed produce.
    """
    import json

    from lite_ft.plan.fit import plan

    result = plan(recipe, overrides, device=device, gpu_memory=gpu_memory, budget=budget,
                  allow_method_change=allow_method_change)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    from lite_ft.plan.report import describe, describe_fit

    click.echo(describe(result))
    if budget is not None:
        click.echo(describe_fit(result))


def entry() -> None:
    """The `lite-ft` command: the allocator set up for training first (lite_ft.allocator: this may restart the
    process once, with jemalloc preloaded or with GLIBC_TUNABLES), then the commands."""
    from lite_ft.allocator import restart_for_training

    restart_for_training()
    main()
