"""
Benchmark picochat's BPE trainer against the `rustbpe` wheel (nanochat's Rust trainer) on the same >= 10 MB of
real text, with the same split pattern and vocabulary sizes. Wall time covers everything from documents to
merges for both: regex splitting, chunk counting and the merge loop.

    python tests/bench_tokenizer.py                # needs ../shared/data; installs rustbpe with pip if missing
    python tests/bench_tokenizer.py --repeats=3    # best of 3 runs each (the machine may be shared and noisy)

The last line is one JSON object with both times and their ratio at vocab 4096 and 32768.
"""

import importlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import tokenizer  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
MIN_CHARS = 10_000_000
VOCAB_SIZES = (4096, 32768)
repeats = 2
for arg in sys.argv[1:]:
    if not arg.startswith("--repeats="):
        raise SystemExit(f"unknown argument {arg!r}; usage: python tests/bench_tokenizer.py [--repeats=N]")
    repeats = int(arg.split("=", 1)[1])

# -----------------------------------------------------------------------------
# The text: tinyshakespeare + GSM8K train (question + answer) + MATH-500 (problem + solution), repeated to 10 MB

if not os.path.isdir(SHARED_DATA):
    raise SystemExit(f"{SHARED_DATA} not found: the benchmark needs the shared data folder")
with open(os.path.join(SHARED_DATA, "tinyshakespeare.txt"), encoding="utf-8") as f:
    docs = [f.read()]
with open(os.path.join(SHARED_DATA, "gsm8k_train.jsonl"), encoding="utf-8") as f:
    for line in f:
        row = json.loads(line)
        docs.append(row["question"] + "\n" + row["answer"])
with open(os.path.join(SHARED_DATA, "math500_test.json"), encoding="utf-8") as f:
    docs += [row["problem"] + "\n" + row["solution"] for row in json.load(f)]
unique_chars = sum(map(len, docs))
docs = docs * -(-MIN_CHARS // unique_chars)  # ceil: whole copies until there are at least MIN_CHARS
print(f"text: {len(docs):,} documents, {sum(map(len, docs)):,} characters ({unique_chars:,} unique)")

# -----------------------------------------------------------------------------
# rustbpe, for comparison only

try:
    rustbpe = importlib.import_module("rustbpe")
except ImportError:
    print("installing rustbpe (comparison only) ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "rustbpe"], check=True)
    rustbpe = importlib.import_module("rustbpe")


def train_rustbpe(vocab_size):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(docs), vocab_size, pattern=tokenizer.SPLIT_PATTERN)
    return dict(tok.get_mergeable_ranks())


def train_ours(vocab_size):
    # rustbpe's vocab_size counts no special tokens: ask ours for the same number of merges
    return tokenizer.train_bpe(iter(docs), vocab_size + len(tokenizer.SPECIAL_TOKENS))


def best_time(fn, vocab_size):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn(vocab_size)
        times.append(time.perf_counter() - t0)
    return min(times), result

# -----------------------------------------------------------------------------
# Run, alternating the two trainers so that both see the same machine load

results = {}
for vocab_size in VOCAB_SIZES:
    ours_s, ours = best_time(train_ours, vocab_size)
    rust_s, rust = best_time(train_rustbpe, vocab_size)
    same = sum(ours.get(token) == rank for token, rank in rust.items())
    print(f"vocab {vocab_size}: ours {ours_s:.2f}s  rustbpe {rust_s:.2f}s  ratio {ours_s / rust_s:.2f}  "
          f"(best of {repeats}; {same}/{len(rust)} tokens with the same rank in both)")
    results[f"ours_{vocab_size}_s"] = round(ours_s, 3)
    results[f"rustbpe_{vocab_size}_s"] = round(rust_s, 3)
    results[f"ratio_{vocab_size}"] = round(ours_s / rust_s, 3)
print(json.dumps(results))
