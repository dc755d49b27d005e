#!/usr/bin/env python3
"""The Python stacks on a manifest's real record lengths: HF transformers + PEFT, with Liger Kernel, and unsloth
(when importable), training a model shape with random bf16 weights on micro-batches whose records have the
lengths lorahost trains on, to set beside `lorahost bench train --manifest M` and `lorahost run M`.

    lorahost check examples/neurips-qwen14b.toml --lengths lengths.txt
    python3 scripts/realdata-baselines.py lengths.txt --shape qwen-14b [--stacks hf,liger,unsloth] [--json OUT]
        [--rows 1024,2048]

Each micro-batch takes the next `--micro-batch` records in the file's order (lorahost's first epoch), padded to
the longest of them with labels -100 and attention mask 0 on the padding (what HF's DataCollatorForSeq2Seq
and LLaMA-Factory do); token ids are random (the weights are too). An optimizer step follows every
`--grad-accum` micro-batches. Printed per stack, one JSON line: real tokens/s (the records' own tokens, no
padding, over the timed wall time), the step time, peak memory, and the wall time of one epoch of the file:
measured when the whole epoch is timed (`--batches 0`, the default), else estimated from the tokens/s.

`--rows L1,L2`: the same stack, in the same process (one model load), also on full rows of L tokens (random
ids, every position trained, micro-batch `--micro-batch`, 2 warm-up and `--row-steps` timed steps): the
anchors of `lorahost bench train --seq L`, one JSON line each.

Shapes, LoRA (r 8, alpha 32, the recipe's q, k, v, o, down) and timing follow scripts/hf-baseline.py, whose
shape table and model builder this script uses. Each stack runs in a child process of its own (Liger and
unsloth patch transformers' classes in place). unsloth loads models from a folder: `--unsloth-dir DIR` names
one holding the shape's weights and a tokenizer; when it has no config.json, the random model is saved there
first (HF save_pretrained; put tokenizer.json and tokenizer_config.json beside it). Needs torch, transformers,
peft and a GPU; run by hand on the GPU machine, never by CI.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def hf_baseline():
    """scripts/hf-baseline.py as a module (its name has a dash)."""
    spec = importlib.util.spec_from_file_location("hf_baseline", Path(__file__).with_name("hf-baseline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_lengths(path, max_len):
    """Record lengths, one per line, each cut to max_len (lorahost already truncated them to max_seq_len)."""
    lengths = []
    for n, line in enumerate(Path(path).read_text().split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        if not line.isdigit() or int(line) == 0:
            sys.exit(f"{path}:{n}: `{line}` is not a positive token count (write the file with `lorahost check --lengths`)")
        lengths.append(min(int(line), max_len))
    if not lengths:
        sys.exit(f"{path}: no lengths")
    return lengths


STACK_NAMES = {"hf": "hf+peft", "liger": "hf+peft+liger", "unsloth": "unsloth"}


def micro_batches(lengths, micro_batch):
    return [lengths[i : i + micro_batch] for i in range(0, len(lengths), micro_batch)]


def unsloth_model(base, shape, directory, dropout):
    """unsloth's model and LoRA on the shape's random weights, saved in `directory` first when missing."""
    import torch

    from unsloth import FastLanguageModel

    directory = Path(directory)
    if not (directory / "config.json").exists():
        model = base.random_model(shape)  # the same random weights as the HF stacks
        model.save_pretrained(directory)
        del model
        torch.cuda.empty_cache()
    if not (directory / "tokenizer_config.json").exists():
        sys.exit(f"{directory}: unsloth loads a tokenizer with the model: put tokenizer.json and tokenizer_config.json there")
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(directory), max_seq_length=4096, dtype=torch.bfloat16, load_in_4bit=False, local_files_only=True
    )
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=32, lora_dropout=dropout, bias="none", target_modules=base.TARGETS,
        use_gradient_checkpointing=False, random_state=0,
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    model.train()
    return model, opt


def measure(a):
    """One stack, in this process: warm-up micro-batches, then the timed ones."""
    import torch

    base = hf_baseline()
    lengths = read_lengths(a.lengths, a.max_len)
    if a.stack == "unsloth":
        if not a.unsloth_dir:
            sys.exit("--stacks unsloth needs --unsloth-dir (see the header of this script)")
        model, opt = unsloth_model(base, a.shape, a.unsloth_dir, a.dropout)
    else:
        model, opt = base.peft_model(a.shape, liger=a.stack == "liger", dropout=a.dropout)
    batches = micro_batches(lengths, a.micro_batch)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def run(i, batch):
        longest = max(batch)
        ids = torch.randint(0, 151000, (len(batch), longest), device="cuda", generator=gen)
        labels, mask = ids.clone(), torch.ones_like(ids)
        for row, n in enumerate(batch):
            labels[row, n:], mask[row, n:] = -100, 0
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss / a.grad_accum
        loss.backward()
        if (i + 1) % a.grad_accum == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for i in range(a.warmup):
        run(i, batches[i % len(batches)])
    opt.zero_grad(set_to_none=True)
    timed = batches if a.batches == 0 else [batches[i % len(batches)] for i in range(a.batches)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i, batch in enumerate(timed):
        run(i, batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = sum(map(sum, timed))
    tokens_per_s = tokens / seconds
    peak = torch.cuda.max_memory_allocated() / 2**30
    results = [{
        "stack": STACK_NAMES[a.stack],
        "shape": a.shape,
        "records": len(lengths),
        "mean_len": round(sum(lengths) / len(lengths), 1),
        "micro_batch": a.micro_batch,
        "grad_accum": a.grad_accum,
        "lora_dropout": a.dropout,
        "timed_micro_batches": len(timed),
        "padded_tokens": sum(max(b) * len(b) for b in timed),
        "tokens": tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms": round(1e3 * seconds / len(timed) * a.grad_accum, 1),
        "epoch_s": round(seconds if a.batches == 0 else sum(lengths) / tokens_per_s, 1),
        "epoch_measured": a.batches == 0,
        "peak_gib": round(peak, 1),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
    }]
    for seq in [int(x) for x in a.rows.split(",") if x.strip()] if a.rows else []:
        results.append(full_rows(a, model, opt, seq, gen))
    return results


def full_rows(a, model, opt, seq, gen):
    """Full rows of `seq` tokens, every position trained: the anchor of `lorahost bench train --seq`."""
    import torch

    try:
        step_s, peak_gib = hf_baseline().time_full_rows(model, opt, a.micro_batch, seq, 2, a.row_steps, gen)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"stack": STACK_NAMES[a.stack], "shape": a.shape, "seq": seq, "error": "out of memory"}
    return {
        "stack": STACK_NAMES[a.stack],
        "shape": a.shape,
        "seq": seq,
        "micro_batch": a.micro_batch,
        "lora_dropout": a.dropout,
        "step_ms": round(step_s * 1e3, 1),
        "tokens_per_s": round(a.micro_batch * seq / step_s, 1),
        "peak_gib": round(peak_gib, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lengths", help="one record length per line (`lorahost check M --lengths FILE`)")
    ap.add_argument("--shape", default="qwen-14b", help="a shape of scripts/hf-baseline.py")
    ap.add_argument("--stacks", default="hf,liger,unsloth", help="comma-separated: hf, liger, unsloth (skipped when not importable)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (the recipe's 0.1; unsloth is fastest at 0)")
    ap.add_argument("--warmup", type=int, default=5, help="micro-batches before timing")
    ap.add_argument("--batches", type=int, default=0, help="micro-batches to time; 0: the whole epoch")
    ap.add_argument("--rows", help="also full rows of these lengths, e.g. 1024,2048 (see above)")
    ap.add_argument("--row-steps", type=int, default=6, help="timed steps per --rows length")
    ap.add_argument("--unsloth-dir", help="model folder for unsloth (see above)")
    ap.add_argument("--json", help="also write the results (a list) here")
    ap.add_argument("--stack", help=argparse.SUPPRESS)  # a child process: measure this one stack
    a = ap.parse_args()

    if a.stack:
        for result in measure(a):
            print(json.dumps(result), flush=True)
        return
    read_lengths(a.lengths, a.max_len)  # fail here, not in every child
    base = hf_baseline()
    if a.shape not in base.SHAPES:
        sys.exit(f"--shape {a.shape}: one of {', '.join(sorted(base.SHAPES))}")
    results = []
    for stack in [s.strip() for s in a.stacks.split(",") if s.strip()]:
        module = {"hf": "peft", "liger": "liger_kernel", "unsloth": "unsloth"}.get(stack)
        if module is None:
            sys.exit(f"--stacks: unknown stack `{stack}` (hf, liger, unsloth)")
        if importlib.util.find_spec(module) is None:
            print(json.dumps({"stack": stack, "skipped": f"`{module}` is not importable"}), flush=True)
            continue
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--stack", stack], capture_output=True, text=True)
        lines = [l for l in child.stdout.splitlines() if l.startswith("{")]
        if child.returncode == 0 and lines:
            found = [json.loads(l) for l in lines]
        else:
            oom = "OutOfMemoryError" in child.stderr
            found = [{"stack": stack, "error": "out of memory" if oom else child.stderr.strip().splitlines()[-1:]}]
        for result in found:
            print(json.dumps(result), flush=True)
        results.extend(found)
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
