#!/usr/bin/env bash
# `lorahost merge` at a real size (BENCHMARKS.md, "merge"): writes a random checkpoint at SHAPE (bf16, ~2 GB
# shards) and a rank-8 adapter, then times `lorahost merge` in a child process and reads its peak RSS.
#   scripts/gpu-merge.sh LORAHOST SHAPE WORKDIR OUT     e.g. scripts/gpu-merge.sh ./lorahost qwen-14b /tmp/m $OUT
# Needs ~2x the model's size of free disk (the model and the merged copy); removes both at the end.
set -euo pipefail
LH=$1 SHAPE=$2 DIR=$3 OUT=$4
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$DIR" "$OUT"
t0=$(date +%s)
"$LH" bench write-model --shape "$SHAPE" --dir "$DIR" --dtype bf16 2>&1 | tail -1
echo "wrote the $SHAPE checkpoint in $(( $(date +%s) - t0 )) s: $(du -sh "$DIR/model" | cut -f1)"
cat > "$DIR/merge.toml" <<TOML
[run]
name = "merge-$SHAPE"
output = "$DIR/run"
[model]
path = "$DIR/model"
tokenizer = "$HERE/tests/fixtures/tokenizer/qwen.tiktoken"
[lora]
rank = 8
alpha = 32
targets = ["c_attn", "c_proj"]
[template]
plugin = "chatml"
[[dataset]]
name = "gsm8k"
source = { plugin = "gsm8k", path = "$HERE/tests/fixtures/samples/gsm8k/train.first200.jsonl" }
TOML
sync
python3 - "$LH" "$DIR" "$SHAPE" "$OUT" <<'PY'
import json, os, resource, subprocess, sys, time
lh, d, shape, out = sys.argv[1:]
t = time.time()
p = subprocess.run([lh, "merge", f"{d}/merge.toml", "--adapter", f"{d}/adapter", "--out", f"{d}/merged"], capture_output=True, text=True)
wall = time.time() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
size = sum(os.path.getsize(os.path.join(f"{d}/model", f)) for f in os.listdir(f"{d}/model")) / 2**30
r = {"shape": shape, "model_gib": round(size, 1), "merge_wall_s": round(wall, 1), "merge_peak_rss_gib": round(rss, 2), "exit": p.returncode, "stderr_tail": p.stderr[-400:]}
print(json.dumps(r, indent=1))
json.dump(r, open(f"{out}/merge-{shape}.json", "w"), indent=1)
PY
rm -rf "$DIR"
