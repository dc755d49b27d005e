#!/usr/bin/env python3
"""The Python anchor for `lorahost bench train`: HF transformers + PEFT LoRA training steps at a named shape
with random bf16 weights, measured the way lorahost measures (warm-up steps, then timed steps, tokens/s and
the allocator's peak memory).

    python3 scripts/hf-baseline.py --shape qwen2.5-14b --seq 1024 --micro-batch 2 [--checkpointing] [--json OUT]

Shapes are the published configs of the models lorahost's `bench train --shape` names (same numbers as
host/src/bench/train.rs). LoRA: r 8, alpha 32, dropout 0.1 on q, k, v, o and down (Qwen v1's c_attn + both
c_proj), the recipe's adapted matrices. Qwen v1 has no HF class in transformers, so `qwen-14b` runs as the
Qwen2 class with Qwen-14B's numbers (no GQA, rope base 1e4), as ../shared/bench does. Attention: sdpa.
Needs torch, transformers, peft (the GPU machine has them); never run by CI.
"""
import argparse
import json
import time

import torch

# name: (HF model_type, hidden, layers, heads, kv heads, head dim, mlp width, vocab, rope base, tied)
SHAPES = {
    "qwen-14b": ("qwen2", 5120, 40, 40, 40, 128, 13696, 152064, 1e4, False),
    "qwen-7b": ("qwen2", 4096, 32, 32, 32, 128, 11008, 151936, 1e4, False),
    "qwen2.5-14b": ("qwen2", 5120, 48, 40, 8, 128, 13824, 152064, 1e6, False),
    "qwen2.5-7b": ("qwen2", 3584, 28, 28, 4, 128, 18944, 152064, 1e6, False),
    "qwen2.5-0.5b": ("qwen2", 896, 24, 14, 2, 64, 4864, 151936, 1e6, True),
    "qwen3-14b": ("qwen3", 5120, 40, 40, 8, 128, 17408, 151936, 1e6, False),
    "qwen3-8b": ("qwen3", 4096, 36, 32, 8, 128, 12288, 151936, 1e6, False),
    "llama-3-8b": ("llama", 4096, 32, 32, 8, 128, 14336, 128256, 5e5, False),
}


def config(shape):
    from transformers import AutoConfig

    kind, hidden, layers, heads, kv, head_dim, mlp, vocab, rope, tied = SHAPES[shape]
    return AutoConfig.for_model(
        kind,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        intermediate_size=mlp,
        vocab_size=vocab,
        rope_theta=rope,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        max_position_embeddings=4096,
        attn_implementation="sdpa",
    )


# The recipe's adapted matrices (Qwen v1's c_attn + both c_proj) in HF's names.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def random_model(shape):
    """Random bf16 weights of the shape on the GPU (seed 0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config(shape), dtype=torch.bfloat16)


def peft_model(shape, checkpointing=False, liger=False, dropout=0.1):
    """random_model with the recipe's LoRA (r 8, alpha 32); returns the model in training mode and its AdamW
    optimizer (lr 5e-5)."""
    from peft import LoraConfig, get_peft_model

    model = random_model(shape)
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, task_type="CAUSAL_LM", target_modules=TARGETS)
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    model.train()
    return model, opt


def time_full_rows(model, opt, micro_batch, seq, warmup, steps, generator=None):
    """Training steps on full rows of `seq` random tokens, every position trained: (seconds a step, peak GiB).
    As ../shared/bench/hf_peft_baseline.py: the peak counter reset before the warm-up, the timed steps after
    it. Also the full-row anchors of scripts/realdata-baselines.py (any stack's model and optimizer)."""
    ids = torch.randint(0, 151000, (micro_batch, seq), device="cuda", generator=generator)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, torch.cuda.max_memory_allocated() / 2**30


def measure(shape, seq, micro_batch, checkpointing, warmup, steps, liger):
    model, opt = peft_model(shape, checkpointing, liger)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step_s, peak_gib = time_full_rows(model, opt, micro_batch, seq, warmup, steps)
    return {
        "stack": "hf+peft" + ("+liger" if liger else ""),
        "shape": shape,
        "seq": seq,
        "micro_batch": micro_batch,
        "checkpointing": checkpointing,
        "trainable_params": sum(p.numel() for p in trainable),
        "step_ms": round(step_s * 1e3, 1),
        "tokens_per_s": round(micro_batch * seq / step_s, 1),
        "peak_gib": round(peak_gib, 1),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--liger", action="store_true", help="apply Liger Kernel's Triton kernels (pip install liger-kernel)")
    ap.add_argument("--json")
    a = ap.parse_args()
    oom = {"shape": a.shape, "seq": a.seq, "micro_batch": a.micro_batch, "checkpointing": a.checkpointing}
    report(lambda: measure(a.shape, a.seq, a.micro_batch, a.checkpointing, a.warmup, a.steps, a.liger), oom, a.json)


def report(measure, oom, path):
    """Prints measure()'s result as one JSON line (`oom` plus an error when the card ran out of memory) and
    writes it to `path` when given."""
    try:
        r = measure()
    except torch.OutOfMemoryError:
        r = dict(oom, error="out of memory")
    print(json.dumps(r))
    if path:
        with open(path, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
