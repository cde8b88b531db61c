#!/usr/bin/env bash
# The GPU check of issue 23, for one H200 (about 8 minutes from a bare machine), from the repository root:
#
#   python bench/gpu_assets.py      # here, once: the SmolLM2 tokenizer and the text, into runs/gpu-assets (4 MiB)
#   bench/gpu_check.sh [OUT]        # there; the device tool's call: carry ["runs/gpu-assets"], command
#                                   #   "bench/gpu_check.sh $OUT"
#
# Needs python3 with torch, transformers, safetensors, typer, rich, accelerate and pytest, which the H200 image has;
# freelunch imports datasets, lm-eval and gguf only for what this check does not run, so no wheel travels.
# Writes OUT/gpu_check.json, OUT/gpu_check.md and OUT/gpu_tests.log (OUT defaults to bench/out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FREELUNCH_TEST_DATA=$PWD/runs/gpu-assets/data TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
status=0
python3 bench/gpu_check.py --assets runs/gpu-assets --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log" || status=1
python3 -m pytest -q -m cuda tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || status=1
exit $status
