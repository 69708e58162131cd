"""The recipe schema: frozen typed sections with their defaults; the docstring under each field says what it means.

Parsing and validation live in lite_ft.recipe.load; checks of this machine in lite_ft.recipe.preflight.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Task = Literal["qa", "classification", "instruction"]
Method = Literal["full", "lora", "qlora"]
Quantization = Literal["none", "8bit", "4bit"]


@dataclass(frozen=True)
class ModelConfig:
    source: str = "smollm2-135m-instruct"
    """Hub id, local model folder, `.gguf` file, or a catalog name (`lite-ft models` lists them)."""
    quantization: Quantization | None = None
    """Base weights: none, 8bit or 4bit (NF4 + double quant). Unset: 4bit for qlora, none otherwise."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype. auto: bf16 on GPUs that support it, fp32 on CPUs (bf16 is ~400x slower on CPUs without it).
    Full fine-tuning keeps fp32 master weights under 16-bit compute; float16 trains with a gradient scaler."""
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel. auto: PyTorch's fused SDPA where the model supports it (on these CPUs about 7x faster and
    ~9x less memory than eager attention at 384 tokens); flash_attention_2 needs the flash-attn package and a GPU."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for Hub ids."""
    trust_remote_code: bool = False
    """Run model code shipped with a Hub repo. Off unless you trust the repo."""
    allow_pickle: bool = False
    """Allow weights in pickle format (.bin/.pt), which can run arbitrary code when loaded."""


@dataclass(frozen=True)
class DataConfig:
    train: str = "builtin:qa-train"
    """Hub dataset id, local .jsonl/.json/.csv/.parquet file, or builtin:NAME (qa-train, qa-eval, ...)."""
    eval: str | None = None
    """Same forms as train; unset: the eval split of the train source (Hub ids) or no evaluation."""
    train_split: str = "train"
    eval_split: str = "validation"
    holdout: int | None = None
    """With no data.eval: hold out this many (seeded random) train rows for evaluation."""
    fields: dict[str, str] = field(default_factory=dict)
    """Task field -> column path in the data, e.g. {answers: answers.text, text: sentence}."""
    labels: list[str] | None = None
    """Class names for classification, in label-index order; unset: taken from the data."""
    max_length: int = 512
    """Tokens per example; see overlong for longer ones."""
    overlong: Literal["auto", "skip", "truncate"] = "auto"
    """Examples over max_length: skip them, or truncate them (the text for classification, the response for
    instruction; a qa answer is never cut). auto: truncate for classification, skip otherwise."""
    limit_train: int | None = None
    limit_eval: int | None = None
    system_prompt: str | None = None
    """Optional system message for chat-formatted prompts."""


@dataclass(frozen=True)
class LoraSection:
    r: int = 16
    """Rank: higher adds capacity, memory and compute."""
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or all-linear (every linear layer but the output head)."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = None
    """Optimizer steps; unset: run `epochs` passes over the data."""
    epochs: float = 1.0
    batch_size: int = 8
    """Examples per forward pass (micro-batch)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; effective batch = batch_size * grad_accum. Only the effective batch decides
    what a step computes: 8 x 1 and 4 x 2 train the same model, 4 x 2 in less memory."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, roughly 30% more compute."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw8bit keeps optimizer state in 8 bits (bitsandbytes): 75% less optimizer memory."""
    group_by_length: bool = True
    """Batch examples of similar length together so little compute is spent on padding."""
    log_every: int = 5
    device: Literal["auto", "cpu", "cuda"] = "auto"
    save_every: int = 50
    """Checkpoint every this many steps (0: only on Ctrl-C); `lite-ft run --resume` continues from the last."""
    keep_checkpoints: int = 2
    skip_nonfinite: int = 0
    """Micro-batches with a non-finite loss or gradient to skip before stopping the run (0: stop at the first)."""
    auto_batch_size: bool = False
    """On CUDA out-of-memory, retry with half the micro-batch and twice the accumulation (same effective batch, so
    the same steps), from the failed attempt's last checkpoint."""
    release_memory: bool = False
    """CPU (Linux): hand freed activation memory back to the OS at once instead of keeping it in glibc's heap.
    Measured on SmolLM2-135M / SQuAD LoRA: peak RSS 0.57x, tokens/s 0.79x (fresh pages for every new tensor)."""
    memory_snapshot: bool = False
    """On CUDA, write memory_snapshot.pickle (allocator history) into output.dir for https://pytorch.org/memory_viz."""


@dataclass(frozen=True)
class EvalConfig:
    baseline: bool = False
    """Also evaluate the untrained model before training."""
    batch_size: int = 16
    max_new_tokens: int = 32
    """Generation budget per answer (qa)."""


@dataclass(frozen=True)
class OutputConfig:
    dir: str = "runs/latest"
    save_model: bool = True
    """Write the adapter (lora/qlora) or the full weights, and the tokenizer."""


@dataclass(frozen=True)
class Recipe:
    task: Task
    method: Method
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "lora": LoraSection,
    "train": TrainConfig, "eval": EvalConfig, "output": OutputConfig,
}
