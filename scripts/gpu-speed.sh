#!/usr/bin/env bash
# Issue 12's numbers (BENCHMARKS.md, "Speed") in one go on the GPU machine, lorahost and the Python stacks on the
# same card in the same run:
#   scripts/gpu-speed.sh path/to/lorahost OUTDIR [STACKS]   STACKS: hf,liger,unsloth (default), a subset, or none
#   scripts/gpu-speed.sh none OUTDIR hf                     the Python stacks only (OUTDIR/lengths.txt must exist)
# lorahost: numerics, the recipe's records (examples/neurips-qwen14b.toml) padded and padding-free over one whole
# epoch of the sample stream, full rows at 1024 and 2048 with and without recomputation. The Python stacks:
# scripts/realdata-baselines.py on the same record lengths (`lorahost check --lengths`) plus full rows of 1024 and
# 2048 (one model load per stack). unsloth needs its packages (../shared/bench/make_unsloth_site.sh) on
# PYTHONPATH and writes a random model folder of the shape under $UNSLOTH_DIR (default /tmp/unsloth-qwen-14b).
set -uo pipefail
LH=${1:?lorahost binary} R=${2:?output folder} STACKS=${3:-hf,liger,unsloth}
mkdir -p "$R"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
date -u | tee -a "$R/card.txt"
if [ "$LH" != none ]; then
"$LH" bench numerics --device cuda:0 --json "$R/numerics.json" > "$R/log_numerics.txt" 2>&1
echo "numerics exit $? ($(grep -c '"ok": *false' "$R/numerics.json") failed)"
M=examples/neurips-qwen14b.toml
"$LH" check $M --lengths "$R/lengths.txt" > "$R/log_check.txt" 2>&1 || tail -3 "$R/log_check.txt"
records=$(wc -l < "$R/lengths.txt")
epoch_steps=$(( (records + 7) / 8 ))  # the recipe's micro-batch 2 x grad_accum 4
B="bench train --shape qwen-14b --device cuda:0 --dtype bf16 --micro-batch 2"
summary() {
  python3 -c "import json,sys
d = json.load(open(sys.argv[1])); d = d if isinstance(d, list) else [d]
for r in d: print(sys.argv[1].split('/')[-1], r.get('packing'), r['seq'], 'recompute' if r['recompute'] else '-', round(r['step_ms'], 1), 'ms', round(r['tokens_per_s']), 'tok/s', round(r['peak_gib'], 2), 'GiB', r['timed_steps'], 'steps')" "$1"
}
# `--fusion no-flash`: the scores-in-memory attention instead of flash, to show what flash buys at each length.
for cfg in "recipe-padding-free --manifest $M --packing padding-free --warmup 3 --steps $epoch_steps" \
           "recipe-none --manifest $M --packing none --warmup 3 --steps $epoch_steps" \
           "s1024 --seq 1024 --warmup 2 --steps 8" \
           "s1024-noflash --seq 1024 --warmup 2 --steps 8 --fusion no-flash" \
           "s1024r --seq 1024 --warmup 2 --steps 8 --recompute" \
           "s2048 --seq 2048 --warmup 2 --steps 6" \
           "s2048-noflash --seq 2048 --warmup 2 --steps 6 --fusion no-flash" \
           "s2048r --seq 2048 --warmup 2 --steps 6 --recompute"; do
  set -- $cfg; name=$1; shift
  $LH $B "$@" --json "$R/ours_$name.json" > "$R/log_$name.txt" 2>&1 || grep -i "error" "$R/log_$name.txt" | head -3
  [ -f "$R/ours_$name.json" ] && summary "$R/ours_$name.json"
done
fi
if [ "$STACKS" != none ]; then
  mkdir -p "${UNSLOTH_DIR:=/tmp/unsloth-qwen-14b}"
  gunzip -c tests/fixtures/tokenizer/tokenizer.json.gz > "$UNSLOTH_DIR/tokenizer.json"
  [ -f "$UNSLOTH_DIR/tokenizer_config.json" ] || echo '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}' > "$UNSLOTH_DIR/tokenizer_config.json"
  python3 scripts/realdata-baselines.py "$R/lengths.txt" --shape qwen-14b --stacks "$STACKS" --micro-batch 2 \
    --grad-accum 4 --batches 120 --rows 1024,2048 --unsloth-dir "$UNSLOTH_DIR" --json "$R/python-stacks.json" 2>&1 | tee "$R/log_python.txt"
fi
