"""The TRL reference: TRL's SFTTrainer + PEFT LoRA trained on exactly what `lite-ft run` trains on, timed in-process.

Same examples and token ids: lite-ft's own QA task encodes the recipe's training data (bench_common), and TRL gets
the result pre-tokenized: `input_ids` plus a `completion_mask` (1 on the answer tokens), from which SFTTrainer with
`completion_only_loss=True` builds its labels. Same order: the dataset is laid out in lite-ft's batch order
(lite_ft.data.batching.epoch_steps, split_step) and read by a sequential sampler, and the first batches of TRL's own dataloader are
compared with lite-ft's collated batches before training. Same start: SFTTrainer seeds, loads the model and attaches
the adapter in lite-ft's order, so the LoRA init matches (the fingerprint is reported). Same optimisation: learning
rate, scheduler, warmup steps, clipping, weight decay and seed come from the recipe.

Measured: seconds between consecutive step ends (step 1 from the start of training), the loss TRL logs each step,
real tokens per step, and the process's peak RSS sampled every 5 ms.
Run: python benchmarks/trl_reference.py --override data.train=... --override train.max_steps=12 [--out FILE]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from bench_common import (
    RECIPE,
    Encoded,
    PeakRss,
    adapter_fingerprint,
    emit,
    encode_training_data,
    quiet_libraries,
    step_tokens,
    versions,
)
from transformers import TrainerCallback


class StepClock(TrainerCallback):
    """Wall time of each optimizer step (end of the previous step to end of this one, so data loading and logging
    count, as in lite-ft's log), its compute part (step begin to step end), and the logged loss and token count."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.compute_seconds: list[float] = []
        self.losses: list[float] = []
        self.logged_tokens: list[float] = []
        self._last = self._begin = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last = time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._begin = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self.compute_seconds.append(now - self._begin)
        self._last = now

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.logged_tokens.append(float(logs.get("num_tokens", float("nan"))))


def ordered_dataset(data: Encoded, steps: int, batch_size: int) -> Any:
    """The whole training set as a datasets.Dataset in lite-ft's epoch-0 batch order: with a sequential sampler,
    TRL's k-th batch is lite-ft's k-th batch. The first `steps` batches must be full (only the last batch of an
    epoch can be short, and it may sit anywhere once batches are shuffled)."""
    from datasets import Dataset

    if steps > len(data.batches):
        raise SystemExit(f"--steps {steps} is more than one epoch ({len(data.batches)} batches); not supported")
    short = [k + 1 for k, batch in enumerate(data.batches[:steps]) if len(batch) != batch_size]
    if short:
        raise SystemExit(f"lite-ft's batch {short[0]} is short (end of the epoch); use fewer steps")
    order = [i for batch in data.batches for i in batch]
    examples = [data.examples[i] for i in order]
    return Dataset.from_dict({
        "input_ids": [e["input_ids"] for e in examples],
        "completion_mask": [[int(label != -100) for label in e["labels"]] for e in examples],
    })


def sft_config(recipe: Any, steps: int, output_dir: str, autocast: bool = False,
               checkpointing: bool = False) -> Any:
    """SFTConfig from the lite-ft recipe: one micro-batch per step, no saving; weights in the dtype lite-ft picks for
    this CPU, no checkpointing. `autocast`: fp32 weights under bf16 autocast (bf16=True), as the transformers docs
    advise for training on CPUs with AMX; `checkpointing`: TRL's default gradient checkpointing."""
    import torch
    from trl import SFTConfig

    from lite_ft.recipe.precision import pick_dtype

    cfg = recipe.train
    dtype = "float32" if autocast else str(pick_dtype(recipe.model.dtype, torch.device("cpu"))).replace("torch.", "")
    return SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1,
        max_length=recipe.data.max_length, max_steps=steps, learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler,
        warmup_steps=int(cfg.warmup_ratio * steps),  # lite-ft's rounding; TRL would ceil a ratio
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm or 0.0, seed=cfg.seed, data_seed=cfg.seed,
        completion_only_loss=True, packing=False, padding_free=False, shuffle_dataset=False,
        train_sampling_strategy="sequential", model_init_kwargs={"dtype": dtype}, use_cpu=True, bf16=autocast,
        fp16=False, gradient_checkpointing=checkpointing, logging_steps=1, report_to="none", save_strategy="no",
        eval_strategy="no", dataloader_num_workers=0, disable_tqdm=True)


def lora_config(recipe: Any) -> Any:
    from peft import LoraConfig

    lora = recipe.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def same_batches(trainer: Any, expected: list[dict[str, Any]]) -> bool:
    """Whether TRL's first dataloader batches equal lite-ft's collated batches (ids, mask, labels, padding)."""
    import torch

    for got, want in zip(trainer.get_train_dataloader(), expected):
        for key in ("input_ids", "attention_mask", "labels"):
            if not torch.equal(got[key].cpu(), want[key]):
                return False
    return True


def check_recipe(recipe: Any) -> None:
    problems = []
    if recipe.method != "lora":
        problems.append(f"method is {recipe.method}; the TRL reference is LoRA only")
    if recipe.train.grad_accum != 1:
        problems.append("train.grad_accum must be 1 (TRL normalises an accumulated loss by tokens, lite-ft by steps)")
    if not recipe.train.max_steps:
        problems.append("set train.max_steps")
    if problems:
        raise SystemExit("trl_reference: " + "; ".join(problems))


def train_reference(recipe: Any, rss: PeakRss, output_dir: str, **variant: bool) -> dict[str, Any]:
    """Build the TRL trainer on lite-ft's data, check it sees lite-ft's batches, train, return the figures."""
    from trl import SFTTrainer

    from lite_ft.data.batching import collate

    steps, started = recipe.train.max_steps, time.perf_counter()
    data = encode_training_data(recipe)
    expected = [collate([data.examples[i] for i in batch], data.tokenizer.pad_token_id, causal=True)
                for batch in data.batches[:steps]]
    tokens = step_tokens(data, steps)
    dataset = ordered_dataset(data, steps, recipe.train.batch_size)
    data.examples.clear()  # TRL holds its own copy now; lite-ft's run keeps one copy too
    clock = StepClock()
    trainer = SFTTrainer(model=data.model_path, args=sft_config(recipe, steps, output_dir, **variant), train_dataset=dataset,
                         processing_class=data.tokenizer, peft_config=lora_config(recipe), callbacks=[clock])
    identical = same_batches(trainer, expected)
    fingerprint = adapter_fingerprint(trainer.model)
    prep_seconds = time.perf_counter() - started
    rss.mark()
    output = trainer.train()
    return {"name": "trl-lora", "steps": steps, "step_seconds": clock.step_seconds,
            "compute_seconds": clock.compute_seconds, "step_tokens": tokens, "losses": clock.losses,
            "trl_logged_tokens": clock.logged_tokens, "batches_identical_to_lite_ft": identical,
            "adapter_fingerprint": fingerprint, "prep_seconds": prep_seconds,
            "train_runtime": output.metrics.get("train_runtime"),
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "config": {"optim": str(trainer.args.optim), "lr": trainer.args.learning_rate,
                       "scheduler": str(trainer.args.lr_scheduler_type),
                       "warmup_steps": trainer.args.warmup_steps, "max_grad_norm": trainer.args.max_grad_norm,
                       "batch_size": trainer.args.per_device_train_batch_size,
                       "max_length": trainer.args.max_length, "sampler": trainer.args.train_sampling_strategy,
                       "completion_only_loss": trainer.args.completion_only_loss,
                       "gradient_checkpointing": trainer.args.gradient_checkpointing,
                       "bf16_autocast": trainer.args.bf16, "weights_dtype": str(trainer.model.dtype)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(RECIPE), help="lite-ft recipe the reference copies")
    parser.add_argument("--override", action="append", default=[], help="recipe override (section.key=value)")
    parser.add_argument("--out", default=None, help="write the JSON result here instead of stdout")
    parser.add_argument("--autocast", action="store_true", help="fp32 weights under bf16 autocast (bf16=True)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default checkpointing")
    args = parser.parse_args()
    rss = PeakRss().start()
    quiet_libraries()
    from lite_ft.recipe.load import load_recipe

    recipe = load_recipe(args.recipe, args.override)
    check_recipe(recipe)
    with tempfile.TemporaryDirectory(prefix="trl-reference-") as output_dir:
        result = train_reference(recipe, rss, output_dir, autocast=args.autocast,
                                 checkpointing=args.gradient_checkpointing)
    result.update(rss.stop())
    result["versions"] = versions()
    emit(result, args.out)


if __name__ == "__main__":
    main()
