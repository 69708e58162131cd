#!/usr/bin/env bash
# Published table 2: sentiment classification (GLUE SST-2) on MiniLM-L6 (22M) with a new 2-class head, full vs LoRA
# vs QLoRA vs LoRA on 8 bits. Same data, seed, batch shape (32 sentences) and steps for every method; full
# fine-tuning uses a tenth of LoRA's learning rate. Evaluated on all 872 validation sentences.
#   bash benchmarks/bench_sst2.sh          (from the repository root, with lite-ft installed)
# Needs: ../shared/data (or LITE_FT_SHARED_DATA) with sst2_train.jsonl and sst2_validation.jsonl.
# Takes: about 15 minutes on a 2-core CPU (measured figures are in benchmarks/results/sst2-cpu/bench.md).
set -euo pipefail
DATA="${LITE_FT_SHARED_DATA:-../shared/data}"
lite-ft bench recipes/sst2-lora.yaml \
  data.train="$DATA/sst2_train.jsonl" data.eval="$DATA/sst2_validation.jsonl" \
  --methods full,lora,qlora,lora-8bit --steps "${STEPS:-150}" \
  --out "${OUT:-benchmarks/results/sst2-cpu}" "$@"
