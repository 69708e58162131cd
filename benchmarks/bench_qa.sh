#!/usr/bin/env bash
# Published table 1: extractive QA (SQuAD v1.1) on SmolLM2-135M-Instruct, full vs LoRA vs QLoRA vs LoRA on 8 bits.
# Same data, seed, batch shape (8 x up to 384 tokens) and number of steps for every method; full fine-tuning uses a
# tenth of LoRA's learning rate. Each method runs in its own process.
#   bash benchmarks/bench_qa.sh            (from the repository root, with lite-ft installed)
# Needs: ../shared/data (or LITE_FT_SHARED_DATA) with squad_train.jsonl and squad_validation.jsonl.
# Takes: about 30 minutes on a 2-core CPU (measured figures are in benchmarks/results/qa-cpu/bench.md).
set -euo pipefail
DATA="${LITE_FT_SHARED_DATA:-../shared/data}"
lite-ft bench recipes/squad-lora.yaml \
  data.train="$DATA/squad_train.jsonl" data.eval="$DATA/squad_validation.jsonl" data.limit_train=2000 \
  --methods full,lora,qlora,lora-8bit --steps "${STEPS:-16}" --eval-limit "${EVAL_LIMIT:-60}" \
  --out "${OUT:-benchmarks/results/qa-cpu}" "$@"
