#!/usr/bin/env bash
# The shipped defaults end to end on SmolLM2-135M: calibrate 128 x 512 tokens, Wanda 50% with dense statistics,
# then `reconstruct` and `retrain` with no options (2-epoch block reconstruction, then masked-LoRA adapters).
# Each stage's JSON summary, peak RSS (KiB) and wall seconds go to stdout. Usage: bench/default_pipeline.sh [WORK]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
W=${1:-runs/default-pipeline}
D=../shared/data
GGUF=$($PY -c "import sys; sys.path.insert(0, 'bench'); from common import smollm2_gguf; print(smollm2_gguf())")
t() { /usr/bin/time -f "peak_rss_kib %M wall_s %e" "$PY" -m freelunch_cli "$@" --json --quiet; }
t calibrate --model "$GGUF" --data $D/wikitext-2-raw/calib.txt --samples 128 --seqlen 512 --work "$W"
t prune --work "$W" --criterion wanda --sparsity 0.5 --stats dense
t reconstruct --work "$W"
t retrain --work "$W"
for text in $D/wikitext-2-raw/heldout.txt $D/tinyshakespeare/input.txt; do
  t eval --work "$W" --ppl "$text" --seqlen 512 --limit-windows 40
done
