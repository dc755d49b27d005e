#!/usr/bin/env python3
"""Checks a folder written by `lorahost import gguf` against the GGUF file it came from, with an independent
dequantizer: llama.cpp's own Python package `gguf` (pip install gguf numpy).

    python3 scripts/check-gguf-import.py <file.gguf> <folder>

For every tensor: the HF name, the shape, and the values (bf16 or f32) against gguf.quants.dequantize, with the
Llama q/k rotary permutation undone here as transformers' GGUF loader does it. Prints the largest difference per
type and exits non-zero on any mismatch beyond bf16 rounding.
"""
import json, struct, sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
         "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(name):
    stem, suffix = name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, n, part = stem.split(".", 2)
        return f"model.layers.{n}.{LAYER[part]}.{suffix}"
    return f"{GLOBAL[stem]}.{suffix}"


def read_safetensors(folder):
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        base = 8 + n
        for name, t in header.items():
            if name == "__metadata__":
                continue
            a, b = t["data_offsets"]
            buf = np.frombuffer(raw, dtype=np.uint8, count=b - a, offset=base + a)
            if t["dtype"] == "BF16":
                v = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                v = buf.view(np.float32)
            out[name] = v.reshape(t["shape"])
    return out


def main():
    gguf_path, folder = sys.argv[1], Path(sys.argv[2])
    r = GGUFReader(gguf_path)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    heads = int(r.fields[f"{arch}.attention.head_count"].parts[-1][0])
    kv = int(r.fields.get(f"{arch}.attention.head_count_kv", r.fields[f"{arch}.attention.head_count"]).parts[-1][0])
    st = read_safetensors(folder)
    worst, bad = {}, 0
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        want = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(list(reversed([int(x) for x in t.shape])))
        if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            n = heads if ".attn_q." in t.name else kv
            # transformers' reverse_permute_weights: the inverse of convert_hf_to_gguf's permute
            dim = want.shape[0] // n // 2
            want = want.reshape(n, dim, 2, *want.shape[1:]).swapaxes(2, 1).reshape(want.shape)
        name = hf_name(t.name)
        got = st.pop(name)
        if got.shape != want.shape:
            print(f"{name}: shape {got.shape} != {want.shape}")
            bad += 1
            continue
        err = np.abs(got - want) / (np.abs(want) + 1e-30)
        rel = float(np.max(np.where(np.abs(want) > 0, err, np.abs(got))))
        key = t.tensor_type.name
        worst[key] = max(worst.get(key, 0.0), rel)
        if rel > 2 ** -8:  # bf16 keeps 8 significant bits
            print(f"{name}: relative difference {rel:.3g}")
            bad += 1
    for name in st:
        print(f"{name}: in the folder but not in the GGUF")
        bad += 1
    print("largest relative difference per GGUF type:", {k: f"{v:.2e}" for k, v in sorted(worst.items())})
    print(f"{len(r.tensors)} tensors, {bad} mismatches")
    sys.exit(1 if bad else 0)


main()
