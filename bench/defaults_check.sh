#!/bin/bash
# A short check of the defaults on a real model: calibrate (32 x 256 tokens of calib.txt, default cache dtype), Wanda
# 50%, default reconstruct (held-out guard, relative rate), perplexity of dense, pruned and reconstructed on 10 x 512
# held-out WikiText tokens. Not the bench protocol (bench/models.py): a quick look at whether the defaults hold.
#   bench/defaults_check.sh MODEL.gguf WORK        (e.g. runs/models/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf runs/q05)
# Writes WORK.<stage>.json (each stage's --json summary) and prints each stage's exit code and seconds.
set -u
cd "$(dirname "$0")/.."
M=$1 W=$2 FL=.venv/bin/freelunch D=../shared/data/wikitext-2-raw
rm -rf "$W"
step() {  # step NAME ARGS...: one stage, its summary in $W.NAME.json
    local name=$1 s; shift; s=$(date +%s)
    "$FL" "$@" --work "$W" --json > "$W.$name.json" 2> "$W.$name.err"
    echo "$name: exit $? in $(( $(date +%s) - s )) s"
}
step calibrate calibrate --model "$M" --data "$D/calib.txt" --samples 32 --seqlen 256 -q
step prune prune --criterion wanda --sparsity 0.5 -q
for st in dense pruned; do step "eval-$st" eval --stage $st --ppl "$D/heldout.txt" --seqlen 512 --limit-sequences 10 -q; done
step reconstruct reconstruct
step eval-reconstructed eval --stage reconstructed --ppl "$D/heldout.txt" --seqlen 512 --limit-sequences 10 -q
