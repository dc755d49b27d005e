#!/usr/bin/env bash
# The model-families checks on real weights, on the GPU machine, in one run (BENCHMARKS.md, "Model families"):
#   scripts/gpu-families.sh LORAHOST QWEN_GGUF SMOL_GGUF OUT
# OUT: a folder for the results (bring it back as one tarball: at most 8 files come back from the machine).
# LORAHOST: a `--features cuda` build; the GGUFs: what scripts/real-weights.sh fetches (Qwen2.5-Coder-0.5B-Instruct
# Q4_K_M, SmolLM2-135M-Instruct Q4_1). Needs python3 with torch, transformers and peft (the GPU machine has them).
# 1. import both GGUFs; 2. `bench numerics` (every kernel, a 4-layer model of every family, CPU f32 vs GPU bf16);
# 3. logits of lorahost (bf16, GPU) vs HF transformers on the same folder and ids (scripts/hf-check.py);
# 4. greedy chat generation of "What is the capital of France?"; 5. the real fine-tune
# examples/qwen2.5-0.5b-gsm8k.toml, then its adapter through PEFT against lorahost's logits;
# 6. bench train at the Qwen2.5-14B and Qwen3-14B shapes beside HF+PEFT (scripts/hf-baseline.py).
set -uo pipefail
LH=$1 QWEN=$2 SMOL=$3 OUT=$4
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" /tmp/fam
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step import
"$LH" import gguf "$QWEN" /tmp/fam/qwen2.5-0.5b --dtype bf16 2>&1 | tail -3
"$LH" import gguf "$SMOL" /tmp/fam/smollm2-135m --dtype bf16 2>&1 | tail -3

step numerics
"$LH" bench numerics --json "$OUT/numerics.json" > "$OUT/numerics.log" 2>&1; echo "numerics exit $?"
grep -E '"ok": false' -B3 "$OUT/numerics.json" | head -30

# A few hundred tokens of real English prose (the README of this repo is at hand and not code).
sed -n '1,60p' "$HERE/README.md" > /tmp/fam/text.txt
for m in qwen2.5-0.5b smollm2-135m; do
  step "logits vs HF: $m"
  "$LH" logits /tmp/fam/$m --text /tmp/fam/text.txt --out /tmp/fam/$m.logits.safetensors --max-tokens 400 --device cuda:0 --dtype bf16
  python3 "$HERE/scripts/hf-check.py" /tmp/fam/$m /tmp/fam/$m.logits.safetensors --json "$OUT/hf-check-$m.json"
done

step "generate"
for m in qwen2.5-0.5b smollm2-135m; do
  cat > /tmp/fam/$m.toml <<EOF
[run]
name = "$m-chat"
output = "/tmp/fam/runs/$m"
[model]
path = "/tmp/fam/$m"
dtype = "bf16"
device = "cuda:0"
[lora]
rank = 8
alpha = 16
targets = ["all-linear"]
[template]
plugin = "chatml"
[[dataset]]
name = "gsm8k"
source = { plugin = "gsm8k", path = "$HERE/tests/fixtures/samples/gsm8k/train.first200.jsonl" }
EOF
  echo "--- $m:"; "$LH" generate /tmp/fam/$m.toml "What is the capital of France?" --base --max-new 40 | tee "$OUT/generate-$m.txt"
done

step "eval of the base model (examples/qwen2.5-0.5b-gsm8k.toml's [eval] tasks)"
mkdir -p "$HERE/models" && ln -sfn /tmp/fam/qwen2.5-0.5b "$HERE/models/qwen2.5-0.5b"
E="$HERE/examples/qwen2.5-0.5b-gsm8k.toml"
"$LH" eval "$E" --base --limit "${EVAL_LIMIT:-200}" 2>&1 | tail -8
python3 "$HERE/scripts/hf-eval-check.py" /tmp/fam/qwen2.5-0.5b "$HERE/runs/qwen2.5-0.5b-gsm8k/eval-base/mmlu.json" --json "$OUT/hf-eval-check-mmlu.json"

step "fine-tune examples/qwen2.5-0.5b-gsm8k.toml"
"$LH" run "$HERE/examples/qwen2.5-0.5b-gsm8k.toml" > "$OUT/finetune.log" 2>&1; echo "run exit $?"
tail -5 "$OUT/finetune.log"
cp "$HERE/runs/qwen2.5-0.5b-gsm8k/metrics.jsonl" "$OUT/finetune-metrics.jsonl" 2>/dev/null
A="$HERE/runs/qwen2.5-0.5b-gsm8k/adapter"
"$LH" logits /tmp/fam/qwen2.5-0.5b --adapter "$A" --text /tmp/fam/text.txt --out /tmp/fam/adapted.logits.safetensors --max-tokens 400 --device cuda:0 --dtype bf16
python3 "$HERE/scripts/hf-check.py" /tmp/fam/qwen2.5-0.5b /tmp/fam/adapted.logits.safetensors --adapter "$A" --json "$OUT/hf-check-peft.json"
"$LH" generate "$E" "Q: Tom has 3 apples and buys 5 more. How many apples does he have?" --max-new 60 | tee "$OUT/generate-finetuned.txt"

step "eval after the fine-tune, and the comparison"
"$LH" eval "$E" --limit "${EVAL_LIMIT:-200}" 2>&1 | tail -8
"$LH" eval compare "$HERE/runs/qwen2.5-0.5b-gsm8k/eval-base" "$HERE/runs/qwen2.5-0.5b-gsm8k/eval" | tee "$OUT/eval-compare.txt"
cp -r "$HERE/runs/qwen2.5-0.5b-gsm8k/eval-base" "$OUT/eval-base"; cp -r "$HERE/runs/qwen2.5-0.5b-gsm8k/eval" "$OUT/eval"
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0

step "bench train at GQA shapes"
for shape in qwen2.5-14b qwen3-14b; do
  "$LH" bench train --shape $shape --device cuda:0 --dtype bf16 --micro-batch 2 --seq 1024 --warmup 2 --steps 6 --json "$OUT/bench-$shape.json" > /dev/null 2>&1
  python3 -c "import json;r=json.load(open('$OUT/bench-$shape.json'));print('lorahost $shape', r.get('tokens_per_s'), 'tok/s', r.get('peak_gib'), 'GiB')"
  python3 "$HERE/scripts/hf-baseline.py" --shape $shape --seq 1024 --micro-batch 2 --json "$OUT/hf-$shape.json"
done
