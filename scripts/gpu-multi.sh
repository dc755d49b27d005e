#!/usr/bin/env bash
# Several GPUs (issue 13), on the GPU machine:
#   scripts/gpu-multi.sh path/to/lorahost OUTDIR
# (lorahost built with `--features cuda`.) With one GPU it runs (a) only: a 1-GPU NCCL smoke run. With 2 or
# more it also runs (b), the acceptance: `bench train` at the Qwen-14B shape (seq 1024, micro-batch 2 per GPU)
# on 1, 2 and 4 GPUs (scaling efficiency), `lorahost run` on 2 GPUs against 1 (loss curves), and one rank
# killed mid-run (a clear error, then a resume that finishes). Writes OUTDIR/*.json, *.jsonl and logs;
# prints a summary line per check. NCCL itself comes from PyTorch's nvidia-nccl wheel (found below).
set -uo pipefail
LH=$(realpath "${1:?lorahost binary}") R=$(mkdir -p "${2:?output folder}" && realpath "$2")
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# libnccl.so.2 (opened by lorahost at run time) and the CUDA libraries.
NCCL_LIB=$(python3 - <<'EOF' 2>/dev/null
import glob, site, sys
dirs = site.getsitepackages() + [site.getusersitepackages()]
hits = [p for d in dirs for p in glob.glob(d + "/nvidia/*/lib/libnccl.so.2")]
print(hits[0].rsplit("/", 1)[0] if hits else "")
EOF
)
[ -z "$NCCL_LIB" ] && NCCL_LIB=$(dirname "$(find / -name 'libnccl.so.2' -not -path '/proc/*' 2>/dev/null | head -1)" 2>/dev/null)
[ -n "$NCCL_LIB" ] && export LD_LIBRARY_PATH="$NCCL_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -d /usr/local/cuda-13.0/targets/x86_64-linux/lib ] && export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:$LD_LIBRARY_PATH"
# NVLink multicast stays off on these shared machines (the device notes: it can take the host's GPUs out of
# service); the ranks inherit it.
export NCCL_NVLS_ENABLE=0
echo "libnccl: ${NCCL_LIB:-NOT FOUND (pip install nvidia-nccl-cu13)}" | tee "$R/card.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$R/card.txt"
NGPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
date -u | tee -a "$R/card.txt"

# A short GPU manifest from the quickstart: 2 padded passes of 2 records per step (its 4 records a step, so the
# same run on 1 or 2 GPUs), STEPS steps, its run folder under OUTDIR.
manifest() {  # name steps
  sed -e "s|\"\.\./runs/quickstart-gpu|\"$R/$1|" -e "s|\"\.\./|\"$ROOT/|g" \
      -e 's/^micro_batch = 4/micro_batch = 2/' -e 's/^grad_accum = 1/grad_accum = 2\npacking = "none"/' \
      -e "s/^epochs = 20/epochs = 100\nmax_steps = $2/" -e 's/^checkpoint_every = 40/checkpoint_every = 10/' \
      examples/quickstart-gpu.toml > "$R/$1.toml"
  echo "$R/$1.toml"
}
losses() { python3 -c "import json,sys; print([round(json.loads(l)['loss'], 4) for l in open(sys.argv[1])])" "$1"; }

# (a) One GPU through NCCL (world size 1): the whole trainer, the rendezvous and the all-reduce path.
M=$(manifest smoke 20)
"$LH" run --gpus 1 "$M" > "$R/log_smoke.txt" 2>&1; echo "(a) smoke --gpus 1: exit $? $(grep -o 'NCCL [0-9.]*' "$R/log_smoke.txt" | head -1); $(grep -m1 'steps; loss' "$R/log_smoke.txt")"
[ "$NGPU" -lt 2 ] && { echo "one GPU: (b) needs 2 or more"; exit 0; }

# (b1) Scaling: the same step per GPU on 1, 2, 4 GPUs; efficiency = tok/s(N) / (N x tok/s(1)).
B="bench train --shape qwen-14b --device cuda:0 --dtype bf16 --micro-batch 2 --seq 1024 --warmup 2 --steps 8"
for n in 1 2 4; do
  [ "$n" -gt "$NGPU" ] && continue
  $LH $B --gpus $n --json "$R/scale_$n.json" > "$R/log_scale_$n.txt" 2>&1 || grep -i "error" "$R/log_scale_$n.txt" | head -3
done
python3 - "$R" <<'EOF'
import json, os, sys
r = sys.argv[1]
one = json.load(open(f"{r}/scale_1.json")) if os.path.exists(f"{r}/scale_1.json") else None
for n in (1, 2, 4):
    p = f"{r}/scale_{n}.json"
    if not os.path.exists(p):
        continue
    d = json.load(open(p))
    eff = d["tokens_per_s"] / (n * one["tokens_per_s"]) if one else float("nan")
    print(f"(b1) {n} GPU(s): {d['step_ms']:.1f} ms/step, {d['tokens_per_s']:.0f} tok/s, peak {d['peak_gib']:.2f} GiB, efficiency {eff:.3f}")
EOF

# (b2) The same run on 1 and 2 GPUs: the loss curves (bf16: NCCL sums in its own order).
M1=$(manifest same_1gpu 40) M2=$(manifest same_2gpu 40)
"$LH" run --gpus 1 "$M1" > "$R/log_same_1gpu.txt" 2>&1; e1=$?
"$LH" run --gpus 2 "$M2" > "$R/log_same_2gpu.txt" 2>&1; e2=$?
cp "$R/same_1gpu/metrics.jsonl" "$R/same_1gpu.jsonl" 2>/dev/null; cp "$R/same_2gpu/metrics.jsonl" "$R/same_2gpu.jsonl" 2>/dev/null
echo "(b2) exits $e1 $e2; max |loss 2 GPUs - 1 GPU| over 40 steps: $(python3 -c "
import json,sys
a=[json.loads(l)['loss'] for l in open(sys.argv[1])]; b=[json.loads(l)['loss'] for l in open(sys.argv[2])]
print(max(abs(x-y) for x,y in zip(a,b)), 'first/last', round(a[0],4), round(a[-1],4), 'vs', round(b[0],4), round(b[-1],4))" "$R/same_1gpu.jsonl" "$R/same_2gpu.jsonl")"

# (b3) Kill rank 1 mid-run (SIGKILL): rank 0 and the spawner stop with an error naming it; the rerun resumes.
M=$(manifest kill 200)
"$LH" run --gpus 2 "$M" > "$R/log_kill.txt" 2>&1 &
parent=$!
for _ in $(seq 600); do [ "$(cat "$R/kill/metrics.jsonl" 2>/dev/null | wc -l)" -ge 25 ] && break; sleep 0.1; done
rank1=$(for p in $(pgrep -P $parent); do tr '\0' '\n' < /proc/$p/environ | grep -qx RANK=1 && echo $p; done)
t0=$(date +%s.%N); kill -9 $rank1; wait $parent; ek=$?; t1=$(date +%s.%N)
echo "(b3) killed rank 1 (pid $rank1) at step $(wc -l < "$R/kill/metrics.jsonl"): exit $ek after $(python3 -c "print(round($t1-$t0,2))") s"
grep -E "rank 1|exited with" "$R/log_kill.txt" | head -3
"$LH" run --gpus 2 "$M" > "$R/log_kill_resume.txt" 2>&1; echo "(b3) resume: exit $? $(grep -m1 'steps; loss' "$R/log_kill_resume.txt")"
