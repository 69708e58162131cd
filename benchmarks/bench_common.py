"""What the speed benchmark's processes share: the recipe overrides of every run, lite-ft's own encoding and batch
order of the training data (so the TRL reference trains on exactly lite-ft's token sequences), and small helpers.

Nothing here trains; each benchmark process imports it and does its one job.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "squad-lora.yaml"  # LoRA r16 alpha 32 dropout 0, all-linear, batch 8, max_length 384
FULL_RECIPE = REPO / "recipes" / "qa-full.yaml"  # only its learning rate is used, for method=full
MIB = 1024 * 1024


def default_data_dir() -> Path:
    """The shared SQuAD copies: $LITE_FT_SHARED_DATA, else ../shared/data next to the repository."""
    return Path(os.environ.get("LITE_FT_SHARED_DATA", REPO.parent / "shared" / "data"))


def full_lr() -> float:
    """Full fine-tuning's learning rate, read from recipes/qa-full.yaml (LoRA's 3e-4 would wreck the full model)."""
    import yaml

    return float(yaml.safe_load(FULL_RECIPE.read_text(encoding="utf-8"))["train"]["lr"])


def run_overrides(method: str, steps: int, data_dir: Path, eval_examples: int, out_dir: Path) -> list[str]:
    """Overrides of recipes/squad-lora.yaml for one benchmark run: local SQuAD, `steps` steps logged one by one, a
    small generation eval, no baseline eval, no checkpoints, no weights written."""
    overrides = [f"method={method}",
                 f"data.train={data_dir / 'squad_train.jsonl'}",
                 f"data.eval={data_dir / 'squad_validation.jsonl'}",
                 f"data.limit_eval={eval_examples}",
                 "eval.baseline=false",
                 f"train.max_steps={steps}",
                 "train.log_every=1",
                 "train.save_every=0",
                 "output.save_model=false",
                 f"output.dir={out_dir}"]
    if method == "full":
        overrides.append(f"train.lr={full_lr()}")
    return overrides


@dataclass
class Encoded:
    """lite-ft's training examples as its run encodes them, and the batches of its first epoch, in order."""

    model_path: str
    tokenizer: Any
    examples: list[dict[str, list[int]]]  # input_ids, labels (-100 on the prompt)
    batches: list[list[int]]  # indices into `examples`; batch k is what lite-ft trains on at micro-step k+1


def encode_training_data(recipe: Any) -> Encoded:
    """Encode the recipe's training data with lite-ft's own task code, and order it as lite-ft's loop does
    (lite_ft.run encodes every usable example and skips those over data.max_length; lite_ft.train draws epoch 0's
    steps from lite_ft.data.batching.epoch_steps and splits each with split_step; with grad_accum 1 a step is one
    batch)."""
    from lite_ft.data.batching import epoch_steps, split_step
    from lite_ft.data.load import load_splits
    from lite_ft.model import load_tokenizer
    from lite_ft.sources.resolve import resolve_source
    from lite_ft.data.tasks import get_task

    task = get_task(recipe.task)
    train_split, _ = load_splits(recipe, task)
    model_path = resolve_source(recipe.model.source, recipe.model.allow_pickle)
    tokenizer = load_tokenizer(model_path, recipe)
    encoded = [task.encode(example, tokenizer, recipe) for example in train_split.examples]
    examples = [item for item in encoded if item is not None]
    cfg = recipe.train
    lengths = [len(e["input_ids"]) for e in examples]
    steps = epoch_steps(lengths, cfg.batch_size * cfg.grad_accum, cfg.seed, 0, cfg.group_by_length)
    batches = [micro for step in steps for micro in split_step(step, lengths, cfg.batch_size)]
    return Encoded(model_path=model_path, tokenizer=tokenizer, examples=examples, batches=batches)


def step_tokens(data: Encoded, steps: int) -> list[int]:
    """Real (non-padding) tokens of each of the first `steps` optimizer steps (one micro-batch per step)."""
    return [sum(len(data.examples[i]["input_ids"]) for i in batch) for batch in data.batches[:steps]]


def adapter_fingerprint(model: Any) -> str:
    """sha256 over the names and bytes of the trainable parameters: equal fingerprints mean the same LoRA init."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class PeakRss:
    """Peak resident set size of this process, sampled by a daemon thread every `interval_s` (5 ms by default), the
    way lite-ft's MemoryMonitor samples it; `mark()` starts a second peak from now (e.g. from the first step)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.peak = self.since_mark = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            self.peak = max(self.peak, rss)
            self.since_mark = max(self.since_mark, rss)
            time.sleep(self.interval_s)

    def mark(self) -> None:
        self.since_mark = self._proc.memory_info().rss

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mib": self.peak / MIB, "peak_rss_since_mark_mib": self.since_mark / MIB}


def emit(result: dict[str, Any], out: str | None) -> None:
    """The process's result: one JSON object on stdout, or in the file `out`."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).write_text(text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")


def versions() -> dict[str, str]:
    """Installed versions of lite-ft, TRL and the libraries the figures depend on."""
    from lite_ft.util import versions as library_versions

    return library_versions(extra=("trl",))


def quiet_libraries() -> None:
    """The warnings lite-ft's CLI silences, silenced the same way in the benchmark's own processes."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
