#!/usr/bin/env python3
"""Recomputes the log-likelihoods of a `lorahost eval` multiple-choice result with HF transformers.

    python3 scripts/hf-eval-check.py MODEL_DIR RUN/eval/mmlu.json [--adapter DIR] [--json OUT]

For every record and choice of the result file: the log-likelihood of the choice after the prompt, split as
lm-evaluation-harness (and lorahost) split it: the prompt's trailing whitespace moves to the continuation, then
prompt + continuation is tokenized whole and cut at the length of the prompt's own tokens. Prints the largest and
mean absolute difference from lorahost's numbers, and how often both pick the same choice. Both sides run the
model in bf16 on the GPU (HF with sdpa), so differences of ~1e-2 per token are expected; the chosen answers should
agree. Needs torch and transformers (peft for --adapter); for the GPU machine, never for CI.
"""
import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("result")
    ap.add_argument("--adapter")
    ap.add_argument("--json")
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16).to(dev).eval()
    if a.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, a.adapter).to(dev).eval()
    result = json.load(open(a.result))

    def loglik(context, continuation):
        trimmed = context.rstrip()
        continuation = context[len(trimmed):] + continuation
        ctx = tok(trimmed, add_special_tokens=False)["input_ids"]
        whole = tok(trimmed + continuation, add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx):]
        ids = torch.tensor([whole], device=dev)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, len(ctx):]
        return lp[len(ctx) - 1 :].gather(1, targets.unsqueeze(1)).sum().item() if cont else 0.0

    diffs, same, n = [], 0, 0
    for r in result["records"]:
        if not r.get("choices"):
            continue
        ours = r["logprobs"]
        theirs = [loglik(r["prompt"], c) for c in r["choices"]]
        diffs += [abs(x - y) for x, y in zip(ours, theirs)]
        same += int(max(range(len(ours)), key=ours.__getitem__) == max(range(len(theirs)), key=theirs.__getitem__))
        n += 1
    report = {
        "task": result["task"],
        "records": n,
        "choices": len(diffs),
        "max_abs_diff": max(diffs) if diffs else None,
        "mean_abs_diff": sum(diffs) / len(diffs) if diffs else None,
        "same_choice": same / n if n else None,
    }
    print(json.dumps(report, indent=2))
    if a.json:
        json.dump(report, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
