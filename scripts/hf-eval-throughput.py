#!/usr/bin/env python3
"""The HF transformers anchor for `lorahost bench eval`: evaluation throughput at a named shape with random bf16
weights (no download, sdpa attention), on the records lorahost's bench builds, printing the same JSON keys.

    python3 scripts/hf-eval-throughput.py --shape qwen-14b [--records 64 --choices 4 --prompt-tokens 512]
        [--batch-tokens 4096] [--batch 8 --new-tokens 128] [--json OUT]

(a) Log-likelihood as lm-evaluation-harness's HF model scores multiple choice: each choice a row of prompt +
    choice (its last token only predicted), rows right-padded into batched forwards of at most --batch-tokens
    rows x longest, each choice's token log-probabilities gathered. Tokens/s counts what lorahost's bench
    counts: each record's prompt once plus its choices' tokens.
(b) `model.generate` with its KV cache: --batch prompts (left-padded, with their attention mask), greedy,
    exactly --new-tokens each; generated tokens/s.

Record i's prompt has `prompt_length(N, i)` tokens and choice k of it `choice_length(i, k)`, as in
host/src/bench/eval.rs. The shapes and the random model come from scripts/hf-baseline.py. Needs torch and
transformers (the GPU machine has them); never run by CI.
"""
import argparse
import importlib.util
import os
import time

import torch


def baseline():
    """scripts/hf-baseline.py as a module: SHAPES and random_model."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf-baseline.py")
    spec = importlib.util.spec_from_file_location("hf_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompt_length(longest, i):
    return longest - (i * 7919) % (longest // 4 + 1)


def choice_length(i, k):
    return 1 + (i + k) % 3


def records(n, choices, longest, vocab, gen):
    """[(prompt ids, [choice ids, ...])], random ids."""
    ids = lambda length: torch.randint(0, vocab, (length,), generator=gen).tolist()
    return [(ids(prompt_length(longest, i)), [ids(choice_length(i, k)) for k in range(choices)]) for i in range(n)]


def runs_within(lengths, budget):
    """Consecutive items in runs whose count x longest stays within budget (at least one each)."""
    out, i = [], 0
    while i < len(lengths):
        j, longest = i + 1, lengths[i]
        while j < len(lengths) and max(longest, lengths[j]) * (j + 1 - i) <= max(budget, 1):
            longest = max(longest, lengths[j])
            j += 1
        out.append((i, j))
        i = j
    return out


@torch.inference_mode()
def loglikelihoods(model, recs, budget):
    """Sum of each choice's token log-probabilities, one right-padded batched forward per run of rows."""
    rows = [(p + c)[:-1] for p, cs in recs for c in cs]
    spans = [(len(p) - 1, len(c)) for p, cs in recs for c in cs]  # (first predicting position, tokens)
    targets = [c for _, cs in recs for c in cs]
    out = []
    for i, j in runs_within([len(r) for r in rows], budget):
        t = max(len(r) for r in rows[i:j])
        ids = torch.tensor([r + [0] * (t - len(r)) for r in rows[i:j]], device="cuda")
        logits = model(input_ids=ids).logits
        for k in range(i, j):
            start, n = spans[k]
            lp = torch.log_softmax(logits[k - i, start : start + n].float(), dim=-1)
            out.append(lp.gather(1, torch.tensor(targets[k], device="cuda")[:, None]).sum().item())
    return out


@torch.inference_mode()
def generate(model, prompts, new_tokens):
    """Greedy, exactly new_tokens per prompt; returns the generated token count."""
    t = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (t - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    return (out.shape[1] - t) * len(prompts)


def measure(a):
    import transformers

    hf = baseline()
    model = hf.random_model(a.shape).eval()
    vocab = hf.SHAPES[a.shape][7]
    gen = torch.Generator().manual_seed(11)
    recs = records(a.records, a.choices, a.prompt_tokens, vocab, gen)
    prompts = [p for p, _ in records(a.batch, 1, a.prompt_tokens, vocab, gen)]
    loglik_tokens = sum(len(p) + sum(len(c) for c in cs) for p, cs in recs)

    loglikelihoods(model, recs[:1], a.batch_tokens)  # warm-up
    generate(model, prompts, 2)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    loglikelihoods(model, recs, a.batch_tokens)  # .item() synchronises
    loglik_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    generated = generate(model, prompts, a.new_tokens)
    torch.cuda.synchronize()
    generate_s = time.perf_counter() - t0
    return {
        "implementation": f"hf-transformers {transformers.__version__} (torch {torch.__version__}, sdpa)",
        "shape": a.shape,
        "device": torch.cuda.get_device_name(),
        "dtype": "BF16",
        "records": a.records,
        "choices": a.choices,
        "prompt_tokens": a.prompt_tokens,
        "batch_tokens": a.batch_tokens,
        "loglik_tokens": loglik_tokens,
        "loglik_s": loglik_s,
        "loglik_tokens_per_s": loglik_tokens / loglik_s,
        "batch": a.batch,
        "new_tokens": a.new_tokens,
        "generated_tokens": generated,
        "generate_s": generate_s,
        "generated_tokens_per_s": generated / generate_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", required=True, choices=sorted(baseline().SHAPES))
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args()
    baseline().report(lambda: measure(a), {"shape": a.shape, "batch": a.batch, "prompt_tokens": a.prompt_tokens}, a.json)


if __name__ == "__main__":
    main()
