#!/usr/bin/env python3
"""The baselines of BENCHMARKS.md's filter table, on the records `lorahost bench filters --export FILE` wrote:

  pip install datasketch lingua-language-detector
  lorahost bench filters --export /tmp/filter-records.jsonl
  python3 scripts/filter-baselines.py /tmp/filter-records.jsonl

- datasketch MinHashLSH with the same shingles as `minhash-dedup` (word 5-grams, words = runs of letters and
  digits, lowercased) and the same bands x rows (20 x 10, 200 permutations); keep the first record of each
  cluster, as the plugin does. Records/s over signature, query and insert.
- lingua (all languages, high accuracy, models preloaded before timing) on each record's text; records/s, and
  the share of records `language` labelled on which lingua names the same ISO 639-3 language.
"""
import json
import re
import sys
import time

from datasketch import MinHash, MinHashLSH
from lingua import LanguageDetectorBuilder

WORD = re.compile(r"[^\W_]+")  # letters and digits, like the plugin's `words`


def shingles(text, n=5):
    words = [w.lower() for w in WORD.findall(text)]
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def minhash_dedup(records, bands=20, rows=10):
    lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
    dropped = 0
    start = time.perf_counter()
    for r in records:
        grams = shingles(r["text"])
        if not grams:
            continue
        m = MinHash(num_perm=bands * rows, seed=1)
        m.update_batch([g.encode() for g in grams])
        if lsh.query(m):
            dropped += 1
        else:
            lsh.insert(r["id"], m)
    return len(records) / (time.perf_counter() - start), dropped


def language(records):
    detector = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()
    labelled = [r for r in records if r["lang"]]
    start = time.perf_counter()
    theirs = [detector.detect_language_of(r["text"]) for r in records]
    rps = len(records) / (time.perf_counter() - start)
    by_id = {r["id"]: t for r, t in zip(records, theirs)}
    same = sum(1 for r in labelled if by_id[r["id"]] and by_id[r["id"]].iso_code_639_3.name.lower() == r["lang"])
    return rps, same, len(labelled)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    rps, dropped = minhash_dedup(records)
    print(f"datasketch MinHashLSH 20x10: {rps:.0f} records/s, {dropped} of {len(records)} dropped")
    rps, same, labelled = language(records)
    print(f"lingua (all languages): {rps:.0f} records/s; agrees with `language` on {same} of {labelled} "
          f"labelled records ({100 * same / max(labelled, 1):.1f}%)")


if __name__ == "__main__":
    main()
