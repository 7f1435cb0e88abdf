"""
Download pretraining shards of FineWeb-Edu (as nanochat uses them: ~100 MB parquet files with a "text" column)
into $PICOCHAT_DIR/data/fineweb/shard_XXXXX.parquet. The last shard downloaded is the validation shard.

    python data/fineweb.py -n 8              # the first 8 shards (7 train + 1 val)
    python data/fineweb.py --num_shards=240 --workers=16

Rerunning resumes: whole shards are kept, interrupted ones continue from their .part file.
Once at least 2 shards are here, data.pretrain_files() uses them instead of tinyworld.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common
import data
from data.download import download_many

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARDS = 1823  # shards in the dataset: shard_00000 ... shard_01822

# -----------------------------------------------------------------------------
# Settings
num_shards = 8   # also -n N
workers = 8      # parallel downloads


def expand_n(argv):
    """nanochat's spelling `-n 8` -> `--num_shards=8`."""
    argv = list(argv)
    if "-n" in argv:
        i = argv.index("-n")
        argv[i:i + 2] = [f"--num_shards={argv[i + 1] if i + 1 < len(argv) else ''}"]
    return argv


def shard_jobs(n):
    if not 2 <= n <= MAX_SHARDS:
        raise SystemExit(f"error: --num_shards must be 2..{MAX_SHARDS} (train shards + 1 val), got {n}")
    out = data.data_dir("fineweb")
    return [(f"{BASE_URL}/shard_{i:05d}.parquet", os.path.join(out, f"shard_{i:05d}.parquet"), None)
            for i in range(n)]


if __name__ == "__main__":
    common.configure(globals(), expand_n(sys.argv[1:]))
    jobs = shard_jobs(num_shards)
    download_many(jobs, workers)
    common.print0(f"{len(jobs)} shards in {data.data_dir('fineweb')}")
