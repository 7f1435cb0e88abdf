"""
Download the pretraining shards of a corpus (~100 MB parquet files with a "text" column, as nanochat uses them)
into $PICOCHAT_DIR/data/<corpus>/shard_XXXXX.parquet:

    python data/corpus.py -n 8                          # ClimbMix: 8 training shards + the validation shard
    python data/corpus.py --corpus=fineweb-edu -n 240 --workers=16

-n counts training shards: shards 0 .. n-1. The validation shard is always the corpus's last one, whatever -n is
(as nanochat does), so val bpb compares across runs of any size and a bigger download never turns an old
validation shard into training data. -n -1 takes every training shard.

The corpora (the shards are reshuffled copies, made by Karpathy for nanochat):
    climbmix      karpathy/climbmix-400b-shuffle    shards 0..6542   NVIDIA's ClimbMix; nanochat's since 2026-03
    fineweb-edu   karpathy/fineweb-edu-100b-shuffle shards 0..1822   FineWeb-Edu, nanochat's first corpus

Rerunning resumes: whole shards are kept, interrupted ones continue from their .part file. When all are here,
$PICOCHAT_DIR/data/corpus.json names this corpus and its validation shard; from then on data.pretrain_files() (the
tokenizer, pretraining and evaluation) read this corpus instead of the built-in data.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common
import data
from data.download import download_many, hf_file_url

CORPORA = {  # name -> (dataset repository, index of the last shard = the validation shard)
    "climbmix": ("karpathy/climbmix-400b-shuffle", 6542),
    "fineweb-edu": ("karpathy/fineweb-edu-100b-shuffle", 1822),
}

# -----------------------------------------------------------------------------
# Settings
corpus = "climbmix"  # climbmix | fineweb-edu
num_shards = 8       # training shards (also -n N; -1: all); the validation shard comes on top
workers = 8          # parallel downloads


def expand_n(argv):
    """nanochat's spelling `-n 8` -> `--num_shards=8`."""
    argv = list(argv)
    if "-n" in argv:
        i = argv.index("-n")
        argv[i:i + 2] = [f"--num_shards={argv[i + 1] if i + 1 < len(argv) else ''}"]
    return argv


def shard_name(i):
    return f"shard_{i:05d}.parquet"


def shard_jobs(name, n):
    """[(url, path, None)] of training shards 0..n-1 and the validation shard of corpus `name`."""
    if name not in CORPORA:
        raise SystemExit(f"error: --corpus must be one of {', '.join(CORPORA)}, got {name!r}")
    repo, last = CORPORA[name]
    n = last if n == -1 else n
    if not 1 <= n <= last:
        raise SystemExit(f"error: --num_shards must be 1..{last} training shards of {name} (or -1: all), got {n}")
    out = data.data_dir(name)
    return [(hf_file_url(repo, shard_name(i)), os.path.join(out, shard_name(i)), None) for i in [*range(n), last]]


def mark_downloaded(name):
    """Name this corpus and its validation shard as the pretraining text (data.pretrain_files reads it)."""
    common.atomic_write_text(data.corpus_marker(), json.dumps({"corpus": name, "val": shard_name(CORPORA[name][1])}))


if __name__ == "__main__":
    common.configure(globals(), expand_n(sys.argv[1:]))
    jobs = shard_jobs(corpus, num_shards)
    download_many(jobs, workers)
    mark_downloaded(corpus)
    common.print0(f"{corpus}: training shards 0..{len(jobs) - 2} and the validation shard in {data.data_dir(corpus)}")
