#!/usr/bin/env python3
"""Compares lorahost's logits with HF transformers' (and PEFT's) on the same model folder and token ids.

    lorahost logits MODEL_DIR --text FILE --out ours.safetensors --device cuda:0 --dtype bf16 [--adapter DIR]
    python3 scripts/hf-check.py MODEL_DIR ours.safetensors [--adapter DIR] [--json OUT.json]

Reads the ids lorahost scored (so both sides see the same tokens), runs HF's model on them in bf16 on the GPU
(with `PeftModel.from_pretrained(base, DIR)` when --adapter is given) and prints: the relative error of the
logits (||ours - hf|| / ||hf||), the share of positions with the same top-1 token, and the mean log-likelihood
of the text under each. Exits non-zero when top-1 agreement is under 99% or the relative error over 2e-2.
Needs torch, transformers (and peft for --adapter); meant for the GPU machine, never for CI.
"""
import argparse
import json
import sys

import torch
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("ours")
    ap.add_argument("--adapter")
    ap.add_argument("--json")
    ap.add_argument("--max-rel-err", type=float, default=2e-2)
    ap.add_argument("--min-top1", type=float, default=0.99)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16).to(dev).eval()
    if a.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, a.adapter).to(dev).eval()
    ours = load_file(a.ours)
    ids = ours["ids"].to(dev).unsqueeze(0)
    with torch.no_grad():
        hf = model(input_ids=ids).logits[0].float()
    mine = ours["logits"].to(dev).float()
    rel = ((mine - hf).norm() / hf.norm()).item()
    top1 = (mine.argmax(-1) == hf.argmax(-1)).float().mean().item()
    # The exact answer: HF in f32. Both bf16 runs are judged against it, so rounding noise that HF's own
    # bf16 run shows is not counted against lorahost.
    with torch.no_grad():
        exact = model.float()(input_ids=ids).logits[0].float()
    vs_exact = lambda x: (((x - exact).norm() / exact.norm()).item(), (x.argmax(-1) == exact.argmax(-1)).float().mean().item())

    def mean_ll(logits):
        lp = torch.log_softmax(logits[:-1], -1)
        return lp.gather(1, ids[0, 1:].unsqueeze(1)).mean().item()

    report = {
        "model": a.model,
        "adapter": a.adapter,
        "tokens": int(ids.shape[1]),
        "rel_err": rel,
        "top1_agreement": top1,
        "mean_loglik_lorahost": mean_ll(mine),
        "mean_loglik_hf": mean_ll(hf),
        "lorahost_bf16_vs_hf_f32": dict(zip(("rel_err", "top1_agreement"), vs_exact(mine))),
        "hf_bf16_vs_hf_f32": dict(zip(("rel_err", "top1_agreement"), vs_exact(hf))),
        "ok": rel <= a.max_rel_err and top1 >= a.min_top1,
    }
    print(json.dumps(report, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
