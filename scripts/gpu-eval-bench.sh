#!/usr/bin/env bash
# The evaluation throughput of BENCHMARKS.md in one go: `lorahost bench eval` and HF transformers
# (scripts/hf-eval-throughput.py) at the same shape, on the same records, on the same card:
#   scripts/gpu-eval-bench.sh path/to/lorahost OUTDIR [SHAPE]      (SHAPE: qwen-14b unless given)
# (lorahost built with `--features cuda`; the HF script needs torch and transformers.)
# Writes OUTDIR/*.json and logs; prints a summary line per run.
set -uo pipefail
LH=${1:?lorahost binary} R=${2:?output folder} SHAPE=${3:-qwen-14b}
mkdir -p "$R"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$R/card.txt"
date -u | tee -a "$R/card.txt"
summary() {
  python3 -c "import json,sys
r = json.load(open(sys.argv[1]))
if 'error' in r: print(sys.argv[1].split('/')[-1], r['error']); sys.exit()
print(sys.argv[1].split('/')[-1], 'batch', r['batch'], 'loglik', round(r['loglik_tokens_per_s']), 'tok/s', 'generate', round(r['generated_tokens_per_s'], 1), 'tok/s', round(r['peak_gib'], 1), 'GiB')" "$1"
}
# MMLU-like records (prompts of 384-512 tokens, 4 choices of 1-3 tokens); decode batches of 8 and 32.
for b in 8 32; do
  A="--shape $SHAPE --records 64 --choices 4 --prompt-tokens 512 --batch-tokens 4096 --batch $b --new-tokens 128"
  "$LH" bench eval $A --device cuda:0 --dtype bf16 --json "$R/eval_lorahost_b$b.json" > "$R/log_lorahost_b$b.txt" 2>&1 \
    || grep -i "^error" "$R/log_lorahost_b$b.txt"
  [ -f "$R/eval_lorahost_b$b.json" ] && summary "$R/eval_lorahost_b$b.json"
  python3 scripts/hf-eval-throughput.py $A --json "$R/eval_hf_b$b.json" > "$R/log_hf_b$b.txt" 2>&1 || tail -3 "$R/log_hf_b$b.txt"
  [ -f "$R/eval_hf_b$b.json" ] && summary "$R/eval_hf_b$b.json"
done
