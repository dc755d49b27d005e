#!/usr/bin/env bash
# Every GPU number of BENCHMARKS.md in one go, with the HF+PEFT baseline on the same card in the same run:
#   scripts/gpu-bench.sh path/to/lorahost path/to/hf_peft_baseline.py OUTDIR
# (lorahost built with `--features cuda`; the baseline script needs torch, transformers and peft.)
# Writes OUTDIR/*.json and logs; prints a summary line per configuration.
set -uo pipefail
LH=${1:?lorahost binary} HF=${2:?hf_peft_baseline.py} R=${3:?output folder}
mkdir -p "$R"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
date -u | tee -a "$R/card.txt"
B="bench train --shape qwen-14b --device cuda:0 --dtype bf16 --micro-batch 2"
summary() {
  python3 -c "import json,sys
d = json.load(open(sys.argv[1])); d = d if isinstance(d, list) else [d]
for r in d: print(sys.argv[1].split('/')[-1], r['seq'], 'recompute' if r['recompute'] else '-', round(r['step_ms'], 1), 'ms', round(r['tokens_per_s']), 'tok/s', round(r['peak_gib'], 2), 'GiB')" "$1"
}
"$LH" bench numerics --device cuda:0 --json "$R/numerics.json" > "$R/log_numerics.txt" 2>&1; echo "numerics exit $?"
for s in 1024 2048; do
  "$LH" bench ops --shape qwen-14b --device cuda:0 --dtype bf16 --seq $s --json "$R/ops_$s.json" > "$R/log_ops_$s.txt" 2>&1
  tail -1 "$R/log_ops_$s.txt"
done
for cfg in "levers --seq 1024 --warmup 1 --steps 3 --levers" \
           "s1024 --seq 1024 --warmup 2 --steps 8" \
           "s1024r --seq 1024 --warmup 2 --steps 8 --recompute" \
           "s2048 --seq 2048 --warmup 2 --steps 6" \
           "s2048r --seq 2048 --warmup 2 --steps 6 --recompute" \
           "real --seq 1024 --warmup 0 --steps 300 --lr 2e-4 --manifest examples/neurips-qwen14b.toml"; do
  set -- $cfg; name=$1; shift
  $LH $B "$@" --json "$R/ours_$name.json" > "$R/log_$name.txt" 2>&1 || grep -i "^error" "$R/log_$name.txt"
  [ -f "$R/ours_$name.json" ] && summary "$R/ours_$name.json"
done
# The whole trainer on the GPU: the quickstart in bf16 (data pipeline, prefetch, checkpoints, adapter).
"$LH" run examples/quickstart-gpu.toml > "$R/log_quickstart_gpu.txt" 2>&1; tail -3 "$R/log_quickstart_gpu.txt"
OUT="$R" python3 "$HF" 2>&1 | tee "$R/log_hf.txt" | tail -4
