"""Command line: parse, call the library, turn lite-ft's own errors into a clean message and exit code.

Each command imports its library function inside its body: `lite-ft --help` and `lite-ft validate` then start
without loading torch and transformers (seconds on a small machine).
"""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from lite_ft import __version__
from lite_ft.errors import LiteFTError


def _clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show a LiteFTError as `error: ...` with its exit code (2 for recipe problems), never as a traceback."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LiteFTError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


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
@_clean_errors
def run_command(recipe: str, overrides: tuple[str, ...], resume: bool, overwrite: bool) -> None:
    """Fine-tune and evaluate as RECIPE says.

    OVERRIDES are section.key=value pairs checked like the file, e.g. train.max_steps=20 lora.r=8
    output.dir=runs/try2. Results land in output.dir: metrics.json, predictions.jsonl, train_log.jsonl,
    memory.json, recipe.yaml and the adapter or weights. An unfinished run of the same recipe in output.dir
    resumes from its last checkpoint; a different run there is refused unless --overwrite.
    """
    from lite_ft.recipe.load import load_recipe
    from lite_ft.run import run, summary

    parsed = load_recipe(recipe, overrides)
    metrics = run(parsed, resume=resume, overwrite=overwrite)
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
@click.option("--gguf-type", type=click.Choice(["f32", "f16", "q8_0"]), default="f16", show_default=True,
              help="Tensor type of a GGUF export (norms stay f32).")
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
        trip = record["gguf"]["roundtrip"]
        click.echo(f"GGUF read back with transformers: max |logit diff| {trip['max_abs_diff']:.3g}, greedy agreement "
                   f"{100 * trip['greedy_agreement']:.1f}%")
    click.echo(f"peak memory {record['peak_rss_mib']:.0f} MiB (process RSS); details in {out}/export.json")


@main.command("eval")
@click.argument("target", type=click.Path())
@click.argument("overrides", nargs=-1)
@click.option("--recipe", type=click.Path(dir_okay=False), default=None,
              help="Recipe giving the task and eval data (default: a run folder's own recipe.yaml).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write metrics.json and predictions.jsonl here.")
@_clean_errors
def eval_command(target: str, overrides: tuple[str, ...], recipe: str | None, out: str | None) -> None:
    """Evaluate TARGET (a model folder, a run folder or a .gguf file) on the recipe's eval data.

    OVERRIDES are section.key=value pairs applied to the recipe, e.g. data.limit_eval=20.
    """
    from lite_ft.evaluate import evaluate, summary

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
@_clean_errors
def bench_command(recipe: str, overrides: tuple[str, ...], methods: str, steps: int, eval_limit: int | None,
                  out: str, method_overrides: tuple[str, ...], full_lr: float | None) -> None:
    """Train RECIPE with each method on the same data, seed and batch shape, each in its own process, and compare
    memory (what the peak is made of), speed, loss and task scores side by side.

    OVERRIDES are section.key=value pairs applied to every method. A method that fails (out of memory, say) is
    reported and the others go on. Writes bench.json (with the machine), bench.csv, bench.md, bench_memory.png
    and bench_tradeoff.png into --out.
    """
    from lite_ft.bench.runner import bench, plan

    names = [m.strip() for m in methods.split(",") if m.strip()]
    record = bench(plan(recipe, names, steps, eval_limit, out, overrides, method_overrides, full_lr))
    click.echo((Path(out) / "bench.md").read_text(encoding="utf-8"))
    failed = [r["method"] for r in record["methods"] if r["status"] != "ok"]
    click.echo(f"results in {out}/ (bench.json, bench.csv, bench.md, bench_memory.png, bench_tradeoff.png)")
    if failed:
        click.echo(f"failed: {', '.join(failed)} (see the logs in {out}/logs/)", err=True)
        sys.exit(1)
