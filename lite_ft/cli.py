"""Command line: parse, call the library, turn lite-ft's own errors into a clean message and exit code."""
from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
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
    import os
    import warnings

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
@_clean_errors
def run_command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Fine-tune and evaluate as RECIPE says.

    OVERRIDES are section.key=value pairs checked like the file, e.g. train.max_steps=20 lora.r=8
    output.dir=runs/try2. Results land in output.dir: metrics.json, predictions.jsonl, train_log.jsonl,
    memory.json, recipe.yaml and the adapter or weights.
    """
    from lite_ft.config import load_recipe
    from lite_ft.run import run, summary

    parsed = load_recipe(recipe, overrides)
    metrics = run(parsed)
    click.echo(summary(metrics))
    click.echo(f"results in {parsed.output.dir}/ (metrics.json, predictions.jsonl)")


@main.command("validate")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@_clean_errors
def validate_command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE (and OVERRIDES) without running it; print the resolved recipe."""
    from lite_ft.config import dump_recipe, load_recipe

    click.echo(dump_recipe(load_recipe(recipe, overrides)), nl=False)


@main.command("models")
def models_command() -> None:
    """List the built-in catalog: models fetched from PyPI wheels, usable offline as model.source."""
    from lite_ft.catalog import CATALOG, cache_dir

    for entry in CATALOG.values():
        click.echo(f"{entry.name:24} {entry.description}")
    click.echo(f"(cached under {cache_dir() / 'models'})")
