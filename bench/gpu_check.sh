#!/usr/bin/env bash
# The GPU check of issue 23, for one H200 (about 8 minutes from a bare machine), from the repository root:
#
#   python bench/gpu_assets.py      # here, once: the SmolLM2 tokenizer and the text, into runs/gpu-assets (4 MiB)
#   bench/gpu_check.sh [OUT]        # there; the device tool's call: carry ["runs/gpu-assets"], command
#                                   #   "bench/gpu_check.sh $OUT"
#
# Needs python3 with torch, transformers, safetensors, typer, rich, accelerate and pytest, which the H200 image has;
# freelunch imports datasets, lm-eval and gguf only for what this check does not run, so no wheel travels.
# Writes OUT/gpu_check.json, OUT/gpu_check.md, OUT/gpu_paths.md and OUT/gpu_tests.log (OUT defaults to bench/out).
#
# gpu_paths.md (issue 29) checks what no CPU test can, on a 4-block SmolLM2-shaped model: a prefetching
# submodule-window reconstruction with --kl-weight and a short last batch, whose steps must not sync with the host
# (FREELUNCH_SYNC_DEBUG=error), timed without and with FREELUNCH_DETERMINISTIC=1 (the cost of determinism); and bf16
# retraining sharded with FSDP2 under torchrun --nproc-per-node 1 (FREELUNCH_FSDP=1 shards a world of one).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FREELUNCH_TEST_DATA=$PWD/runs/gpu-assets/data TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true
status=0
python3 bench/gpu_check.py --assets runs/gpu-assets --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log" || status=1
python3 -m pytest -q -m cuda tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || status=1

W=/tmp/freelunch-gpu-paths
rm -rf "$W" && mkdir -p "$W"
python3 - "$W/model" <<'PY' || status=1
import sys; sys.path.insert(0, "bench")
import torch
from gpu_check import SHAPES, build
from pathlib import Path
build(Path(sys.argv[1]), {**SHAPES["smollm2-135m"], "num_hidden_layers": 4}, Path("runs/gpu-assets/tokenizer"), torch.device("cuda"))
PY
FL=(python3 -m freelunch_cli)
paths() {  # name, then the command; a row of gpu_paths.md with its exit status and seconds
  local name=$1 t0=$SECONDS rc=0; shift
  "$@" > "$W/$name.log" 2>&1 || rc=$?
  [ $rc -eq 0 ] || { status=1; tail -20 "$W/$name.log"; }
  echo "| $name | $rc | $((SECONDS - t0)) |" | tee -a "$OUT/gpu_paths.md"
}
printf '| check | exit | seconds |\n| --- | --- | --- |\n' > "$OUT/gpu_paths.md"
D=$FREELUNCH_TEST_DATA/wikitext-2-raw
paths calibrate "${FL[@]}" calibrate --work "$W/w" --quiet --model "$W/model" --data "$D/calib.txt" --samples 64 --seqlen 512 --allow-overlap
paths prune "${FL[@]}" prune --work "$W/w" --quiet --criterion wanda --sparsity 0.5
R=(reconstruct --work "$W/w" --quiet --window submodule --kl-weight 0.1 --batch-size 3 --epochs 2 --force)
paths "reconstruct submodule --kl-weight, no host sync" env FREELUNCH_SYNC_DEBUG=error "${FL[@]}" "${R[@]}"
paths "the same, FREELUNCH_DETERMINISTIC=1" env FREELUNCH_SYNC_DEBUG=error FREELUNCH_DETERMINISTIC=1 "${FL[@]}" "${R[@]}"
paths "retrain bf16 FSDP2, torchrun x1" env FREELUNCH_FSDP=1 torchrun --standalone --nproc-per-node 1 -m freelunch_cli \
  retrain --work "$W/w" --peft full --dtype bfloat16 --steps 10 --quiet
paths "retrain bf16 FSDP2, deterministic" env FREELUNCH_FSDP=1 FREELUNCH_DETERMINISTIC=1 torchrun --standalone \
  --nproc-per-node 1 -m freelunch_cli retrain --work "$W/w" --peft full --dtype bfloat16 --steps 10 --force --quiet
exit $status
