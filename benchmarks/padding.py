"""How much of each batch is padding, with and without length grouping: the figure that decides whether
padding-free packing is worth building. Tokenizes lite-ft's SQuAD training examples exactly as a run does and
orders them as the training loop does (lite_ft.data.batching); no model runs.

    python benchmarks/padding.py [--examples 4000] [--out benchmarks/results/levers-cpu]

Writes padding.json and padding.md into --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_common import RECIPE, default_data_dir, quiet_libraries

from lite_ft.data.batching import epoch_steps, split_step
from lite_ft.data.load import load_splits
from lite_ft.data.tasks import get_task
from lite_ft.model import load_tokenizer
from lite_ft.recipe.load import load_recipe
from lite_ft.sources.resolve import resolve_source


def padding_share(lengths: list[int], batch_size: int, seed: int, grouped: bool, epochs: int = 3
                  ) -> dict[str, float]:
    """Padded positions / all positions over `epochs` epochs of batches; also the attention work (sum of squared
    batch lengths) spent on padding, since attention grows with the square of the padded length."""
    real = padded = real_sq = padded_sq = 0
    for epoch in range(epochs):
        for step in epoch_steps(lengths, batch_size, seed, epoch, grouped):
            for micro in split_step(step, lengths, batch_size):
                width = max(lengths[i] for i in micro)
                real += sum(lengths[i] for i in micro)
                padded += width * len(micro)
                real_sq += sum(lengths[i] ** 2 for i in micro)
                padded_sq += width ** 2 * len(micro)
    return {"padding_share_of_positions": 1 - real / padded, "padding_share_of_attention": 1 - real_sq / padded_sq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "levers-cpu"))
    args = parser.parse_args()
    quiet_libraries()
    data = default_data_dir()
    recipe = load_recipe(RECIPE, overrides=[f"data.train={data / 'squad_train.jsonl'}", "data.eval=null",
                                            f"data.limit_train={args.examples}"])
    task = get_task(recipe.task)
    split, _ = load_splits(recipe, task)
    tokenizer = load_tokenizer(resolve_source(recipe.model.source, recipe.model.allow_pickle), recipe)
    encoded = [e for e in (task.encode(x, tokenizer, recipe) for x in split.examples) if e is not None]
    lengths = [len(e["input_ids"]) for e in encoded]
    cfg = recipe.train
    result = {"examples": len(lengths), "batch_size": cfg.batch_size, "max_length": recipe.data.max_length,
              "mean_length": sum(lengths) / len(lengths),
              "grouped": padding_share(lengths, cfg.batch_size, cfg.seed, True),
              "random": padding_share(lengths, cfg.batch_size, cfg.seed, False)}
    g, r = result["grouped"], result["random"]
    md = "\n".join([
        f"# Padding left in SQuAD batches of {cfg.batch_size} ({len(lengths)} examples, mean "
        f"{result['mean_length']:.0f} tokens, max_length {recipe.data.max_length}), 3 epochs of lite-ft's batch order",
        "", "| batches | padded share of positions | padded share of attention work |", "| --- | ---: | ---: |",
        f"| length-grouped (train.group_by_length, the default) | {100 * g['padding_share_of_positions']:.1f}% | "
        f"{100 * g['padding_share_of_attention']:.1f}% |",
        f"| random | {100 * r['padding_share_of_positions']:.1f}% | {100 * r['padding_share_of_attention']:.1f}% |",
        "", f"Command: `python benchmarks/padding.py --examples {args.examples}`", ""])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "padding.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "padding.md").write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
