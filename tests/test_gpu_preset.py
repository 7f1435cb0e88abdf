"""The gpu preset of speedrun.sh, end to end on CPU: its own stage commands and data flow, at toy sizes, against the
loopback hub. Parquet shards -> tokenizer -> `torchrun --nproc_per_node=2` (gloo) pretraining -> sft on the
downloaded chat data -> rl on GSM8K -> evaluation on ARC, MMLU, HellaSwag, GSM8K and MATH-500 -> the report.
Only the sizes differ from a GPU node's run, set through the preset's own size variables."""
import json
import os
import shutil
import subprocess

import torch

from conftest import REPO

TOY = {  # the preset's size variables (speedrun.sh), at toy values
    "DEPTH": "1", "SHARDS": "2", "VOCAB_SIZE": "512", "SEQ_LEN": "256", "DEVICE_BATCH": "2", "SFT_DEVICE_BATCH": "2",
    "TOTAL_BATCH": "1024", "DATA_RATIO": "0.02", "EVAL_TOKENS": "4096", "SFT_EPOCHS": "0.002", "RL_STEPS": "2",
    "RL_PROMPTS": "2", "NEW_TOKENS": "24",
    "COMPILE": "0",  # a GPU's speed-up, and a minute of compiling at toy size on these CPUs
}
# 2 processes: gloo on CPU, NCCL where there are 2+ GPUs; a machine with one GPU runs the one process it can
NPROC = 1 if torch.cuda.device_count() == 1 else 2


def read_json(base, *path):
    with open(os.path.join(base, *path), encoding="utf-8") as f:
        return json.load(f)


def test_gpu_preset_runs_end_to_end_at_toy_size(hub, tmp_base_dir, _prepared_world):
    from loopback_hub import publish_recipe
    publish_recipe(hub)
    # the built-in chats sft mixes in, at toy size too (the preset would generate the full set on demand)
    shutil.copytree(os.path.join(_prepared_world, "data", "tinyworld"), os.path.join(tmp_base_dir, "data", "tinyworld"))
    env = dict(os.environ, PICOCHAT_DIR=tmp_base_dir, PRESET="gpu", OMP_NUM_THREADS="1", NPROC=str(NPROC), **TOY)
    r = subprocess.run(["bash", "speedrun.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "preset: gpu" in out
    for stage in ("tokenizer", "base", "sft", "rl", "eval"):
        assert f"\n== {stage}\n" in out

    # the corpus: training shards 0..SHARDS-1 and the fixed validation shard, all the tokenizer and pretraining read
    climbmix = os.path.join(tmp_base_dir, "data", "climbmix")
    train = [os.path.join(climbmix, f"shard_{i:05d}.parquet") for i in range(2)]
    assert read_json(tmp_base_dir, "report", "tokenizer.json")["train_files"] == train
    assert f"data: 2 train and 1 val files, from {climbmix}" in out
    shards = {p for p, _ in hub.requests("hub", ".parquet") if "climbmix" in p}
    assert shards == {f"/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_{i:05d}.parquet"
                      for i in (0, 1, 6542)}

    # pretraining, sft and rl ran under torchrun (2 gloo processes on CPU); sft trained on the downloaded chats, rl on
    # GSM8K
    device = "cpu" if not torch.cuda.is_available() else "cuda:0"
    assert out.count(f"device: {device}, {NPROC} processes") == 3
    base = read_json(tmp_base_dir, "report", "base.json")
    assert base["config"]["target_param_data_ratio"] == 0.02 and base["metrics"]["tokens"] > 0
    assert read_json(tmp_base_dir, "report", "sft.json")["config"]["num_epochs"] == 0.002
    rl = read_json(tmp_base_dir, "report", "rl.json")
    assert rl["config"]["dataset"] == "gsm8k" and rl["config"]["num_steps"] == 2
    assert "data: gsm8k, 64 train problems" in out

    # every benchmark for every stage, and the report card with its JSON summary
    for stage in ("base", "sft", "rl"):
        results = read_json(tmp_base_dir, "report", f"eval_{stage}.json")["results"]
        assert set(results) == {"bpb", "mc/arc_easy", "mc/arc_challenge", "mc/mmlu", "mc/hellaswag", "math/gsm8k",
                                "math/math500"}, stage
        assert results["mc/hellaswag"]["n"] == 8 and results["math/math500"]["n"] == 8
    assert os.path.exists(os.path.join(tmp_base_dir, "report", "report.md"))
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["bpb"] > 0
