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


def setting(default: Any = dataclasses.MISSING, *, result: bool, factory: Any = dataclasses.MISSING) -> Any:
    """A recipe field with its default, declaring whether changing it can change the trained model or the data it
    sees (`result=True`: a resume with another value is refused) or only speed, memory, logging or evaluation
    (`result=False`: allowed on resume, and recorded)."""
    return field(default=default, default_factory=factory, metadata={"result": result})


@dataclass(frozen=True)
class ModelConfig:
    source: str = setting("smollm2-135m-instruct", result=True)
    """Hub id, local model folder, `.gguf` file, or a catalog name (`lite-ft models` lists them)."""
    quantization: Quantization | None = setting(None, result=True)
    """Base weights: none, 8bit or 4bit (NF4 + double quant). Unset: 4bit for qlora, none otherwise."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", result=True)
    """Compute dtype. auto: bf16 on GPUs that support it, fp32 on CPUs. bfloat16 on a CPU with AMX or AVX512-BF16
    trains ~1.5x faster than fp32 (README, "Precision"); on other CPUs it is ~400x slower, and lite-ft says so.
    Full fine-tuning keeps fp32 master weights under 16-bit compute; float16 trains with a gradient scaler."""
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = setting("auto", result=False)
    """Attention kernel. auto: PyTorch's fused SDPA where the model supports it (on these CPUs about 7x faster and
    ~9x less memory than eager attention at 384 tokens), and in training on the CPU, inside the fused LoRA layers,
    lite-ft's chunked causal attention (lite_ft/training/attention.py: 1.8-2.1x SDPA's speed in bf16, about even
    in fp32); sdpa: PyTorch's SDPA everywhere; flash_attention_2 needs the flash-attn package and a GPU."""
    revision: str | None = setting(None, result=True)
    """Hub revision (branch, tag or commit) for Hub ids."""
    trust_remote_code: bool = setting(False, result=True)
    """Run model code shipped with a Hub repo. Off unless you trust the repo."""
    allow_pickle: bool = setting(False, result=False)
    """Allow weights in pickle format (.bin/.pt), which can run arbitrary code when loaded."""


@dataclass(frozen=True)
class DataConfig:
    train: str = setting("builtin:qa-train", result=True)
    """Hub dataset id, local .jsonl/.json/.csv/.parquet file, or builtin:NAME (qa-train, qa-eval, ...)."""
    eval: str | None = setting(None, result=False)
    """Same forms as train; unset: the eval split of the train source (Hub ids) or no evaluation."""
    train_split: str = setting("train", result=True)
    eval_split: str = setting("validation", result=False)
    holdout: int | None = setting(None, result=True)
    """With no data.eval: hold out this many (seeded random) train rows for evaluation."""
    fields: dict[str, str] = setting(factory=dict, result=True)
    """Task field -> column path in the data, e.g. {answers: answers.text, text: sentence}."""
    labels: list[str] | None = setting(None, result=True)
    """Class names for classification, in label-index order; unset: taken from the data."""
    max_length: int = setting(512, result=True)
    """Tokens per example; see overlong for longer ones."""
    overlong: Literal["auto", "skip", "truncate"] = setting("auto", result=True)
    """Examples over max_length: skip them, or truncate them (the text for classification, the response for
    instruction; a qa answer is never cut). auto: truncate for classification, skip otherwise."""
    limit_train: int | None = setting(None, result=True)
    limit_eval: int | None = setting(None, result=False)
    system_prompt: str | None = setting(None, result=True)
    """Optional system message for chat-formatted prompts."""


@dataclass(frozen=True)
class LoraSection:
    r: int = setting(16, result=True)
    """Rank: higher adds capacity, memory and compute."""
    alpha: float = setting(32.0, result=True)
    dropout: float = setting(0.05, result=True)
    target_modules: str | list[str] = setting("all-linear", result=True)
    """Module names to adapt, or all-linear (every linear layer but the output head)."""


@dataclass(frozen=True)
class EarlyStop:
    metric: str = setting("eval_loss", result=True)
    """What must improve: eval_loss, or a task score that eval.during_limit computes (qa: exact_match, f1;
    classification: accuracy, macro_f1). eval_loss is lower-is-better, the scores higher-is-better."""
    patience: int = setting(3, result=True)
    """Evaluations (eval.every) without improvement after which training stops."""


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = setting(None, result=True)
    """Optimizer steps; unset: run `epochs` passes over the data."""
    epochs: float = setting(1.0, result=True)
    batch_size: int = setting(8, result=False)
    """Examples per forward pass (micro-batch)."""
    grad_accum: int = setting(1, result=False)
    """Micro-batches per optimizer step; effective batch = batch_size * grad_accum. Only the effective batch decides
    what a step computes: 8 x 1 and 4 x 2 train the same model, 4 x 2 in less memory."""
    lr: float = setting(2e-4, result=True)
    weight_decay: float = setting(0.0, result=True)
    warmup_ratio: float = setting(0.05, result=True)
    scheduler: Literal["cosine", "linear", "constant"] = setting("cosine", result=True)
    max_grad_norm: float = setting(1.0, result=True)
    seed: int = setting(0, result=True)
    gradient_checkpointing: bool = setting(False, result=False)
    """Recompute activations in backward: less memory, roughly 30% more compute."""
    optimizer: Literal["adamw", "adamw8bit"] = setting("adamw", result=True)
    """adamw8bit keeps optimizer state in 8 bits (bitsandbytes): 75% less optimizer memory."""
    group_by_length: bool = setting(True, result=True)
    """Batch examples of similar length together so little compute is spent on padding."""
    log_every: int = setting(5, result=False)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", result=False)
    save_every: int = setting(50, result=False)
    """Checkpoint every this many steps (0: only on Ctrl-C); `lite-ft run --resume` continues from the last."""
    keep_checkpoints: int = setting(2, result=False)
    skip_nonfinite: int = setting(0, result=False)
    """Micro-batches with a non-finite loss or gradient to skip before stopping the run (0: stop at the first)."""
    fsdp: bool = setting(False, result=True)
    """On several processes: shard parameters, gradients and optimizer state with FSDP2 instead of replicating
    them (DDP), for a model whose full fine-tune does not fit one device. Same result as DDP within rounding; a
    resume keeps it as it was (the two hold the optimizer state differently)."""
    auto_batch_size: bool = setting(False, result=False)
    """On CUDA out-of-memory, retry with half the micro-batch and twice the accumulation (same effective batch, so
    the same steps), from the failed attempt's last checkpoint."""
    fused_lora: bool = setting(True, result=False)
    """LoRA/QLoRA on Llama-architecture models: hand-written forward and backward passes per decoder layer over
    peft's own adapter weights (one LoRA-A matmul for q/k/v and one for gate/up, SiLU recomputed in backward).
    Same gradients within rounding; measured on SmolLM2-135M / SQuAD: see the README's speed section. Other
    models, lora.dropout > 0 and train.fsdp keep peft's path, with a note in metrics.json (train.fused_lora)."""
    attention_weights: Literal["auto", "keep", "recompute"] = setting("auto", result=False)
    """lite-ft's chunked CPU attention (model.attention: auto, fused LoRA layers): keep the attention weights (the
    softmax) for backward, or recompute them there from the query and key. auto keeps them in bf16 and fp16 while
    they take at most 16 MiB a layer (SmolLM2, SQuAD batch 8 x 348: 349 MiB a step) and recomputes them in fp32
    (the least memory, no more than a flash kernel keeps). Same results either way; measured in the README's speed
    section."""
    release_memory: bool = setting(False, result=False)
    """CPU (Linux): freed memory goes back to the OS at once (lite_ft.allocator): under jemalloc its page decay is set
    to 0; under glibc nearly every activation tensor gets its own mapping (mmap threshold 1 MiB instead of lite-ft's
    4 MiB). The least memory, at a speed cost (fresh pages for every new tensor); measured in the README's speed
    section."""
    memory_snapshot: bool = setting(False, result=False)
    """On CUDA, write memory_snapshot.pickle (allocator history) into output.dir for https://pytorch.org/memory_viz."""
    keep_best: str | None = setting(None, result=True)
    """Keep the weights of the evaluation (eval.every) with the best METRIC as the run's result instead of the last
    step's: eval_loss (lower is better) or a task score computed on eval.during_limit examples (f1, exact_match,
    accuracy, macro_f1; higher is better). metrics.json says which step (`best`). The best weights wait in
    checkpoints/best/ (one extra copy of the trainable weights on disk)."""
    early_stop: EarlyStop | None = setting(None, result=True)
    """Stop when early_stop.metric has not improved for early_stop.patience evaluations, e.g.
    {metric: eval_loss, patience: 3}. Needs eval.every."""
    memory_check: bool = setting(True, result=False)
    """Before loading the model, predict the run's peak memory (`lite-ft plan`) and stop with suggestions when it
    exceeds the memory available (RAM, or free GPU memory): seconds instead of an out-of-memory error minutes in."""
    fit: str | None = setting(None, result=False)
    """A memory budget, e.g. 8GiB: at the start of the run, apply the fastest settings `lite-ft plan --budget` finds
    (micro-batch split, gradient checkpointing, release_memory, adamw8bit) that fit it; recorded in metrics.json."""


@dataclass(frozen=True)
class EvalConfig:
    baseline: bool = setting(False, result=False)
    """Also evaluate the untrained model before training."""
    batch_size: int = setting(16, result=False)
    max_new_tokens: int = setting(32, result=False)
    """Generation budget per answer (qa)."""
    every: int = setting(0, result=False)
    """During training, the eval loss (teacher-forced, batched: no generation) every this many optimizer steps
    and after the last one, into train_log.jsonl, the progress bar and the trackers (0: only the final
    evaluation). Cost: one forward pass over the eval set per evaluation."""
    during_limit: int | None = setting(None, result=False)
    """With eval.every, also the task's scores (qa: generation) on the first this many eval examples at each
    evaluation; needed for train.keep_best or train.early_stop on a score. Unset: the eval loss only."""


@dataclass(frozen=True)
class OutputConfig:
    dir: str = setting("runs/latest", result=False)
    save_model: bool = setting(True, result=False)
    """Write the adapter (lora/qlora) or the full weights, and the tokenizer."""
    report_to: list[str] = setting(factory=list, result=False)
    """Experiment trackers for the training curves, through accelerate: tensorboard, wandb, mlflow (each needs its
    package). TensorBoard logs go to output.dir/trackers/."""


@dataclass(frozen=True)
class Recipe:
    task: Task = field(metadata={"result": True})
    method: Method = field(metadata={"result": True})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def result_keys() -> tuple[str, ...]:
    """Dotted keys whose change can alter the result, as the fields declare."""
    keys = [f.name for f in dataclasses.fields(Recipe) if f.name not in SECTIONS and f.metadata["result"]]
    keys += [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)
             if f.metadata["result"]]
    return tuple(keys)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "lora": LoraSection,
    "train": TrainConfig, "eval": EvalConfig, "output": OutputConfig,
}
LOWER_IS_BETTER = ("eval_loss",)  # tracked metrics where smaller is better; task scores are higher-is-better
DURING_SCORES = {"qa": ("exact_match", "f1"), "classification": ("accuracy", "macro_f1"), "instruction": ()}
