"""
Benchmark: does RL raise the held-out pass@1 of a tiny sft model on the built-in word problems, within 10 CPU
minutes? pass@1 is measured on the same held-out problems, at the same sampling settings, before the first RL step
(= the sft model) and after the last one.

    python tests/bench_rl.py                        # the sft model in $PICOCHAT_DIR, or builds a small one first
    PICOCHAT_DIR=/tmp/pc python tests/bench_rl.py   # somewhere else than ~/.cache/picochat
    python tests/bench_rl.py --loss_norm=sequence --std_norm=1   # extra --key=value go to rl.py (compare recipes)

Without an sft checkpoint in $PICOCHAT_DIR it builds the small CPU pipeline through the stage scripts (printed as
they run; ~35 minutes on 2 busy shared cores, mostly pretraining): python data/tinyworld.py, python tokenizer.py,
python pretrain.py, python sft.py. The last line is one JSON object: {"pass1_sft", "pass1_rl", "minutes", ...}.
"""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402

# the small pipeline: a 4-layer model on the built-in data, sized for a CPU
PIPELINE = [
    ["data/tinyworld.py"],
    ["tokenizer.py", "--vocab_size=4096"],
    ["pretrain.py", "--depth=4", "--aspect_ratio=32", "--max_seq_len=256", "--device_batch_size=16",
     "--total_batch_size=8192", "--num_iterations=500", "--eval_every=250", "--dtype=float32"],
    # 300 steps at lr_scale 0.2: the sft model must solve some problems for RL to have a signal (100 steps at
    # 0.1 left val loss at 1.13 and held-out pass@1 at 1%: rewards were almost all 0)
    ["sft.py", "--max_seq_len=256", "--device_batch_size=16", "--total_batch_size=8192", "--num_iterations=300",
     "--lr_scale=0.2", "--eval_every=150", "--dtype=float32"],
]
# the RL run measured (~5 s a step on 2 cores): evaluated at step 0 (= the sft model) and at the end
RL = ["rl.py", "--num_steps=60", "--eval_every=60", "--prompts_per_step=16", "--num_samples=8",
      "--max_new_tokens=96", "--eval_problems=200", "--eval_samples=4"]


def run(args):
    print("$ " + " ".join(["python", *args]), flush=True)
    # one thread per process unless told otherwise: these tiny matmuls lose more to thread hand-offs than they gain
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, env=env)


if __name__ == "__main__":
    base = common.get_base_dir()
    sft_dir = os.path.join(base, "checkpoints", "sft")
    if not (os.path.isdir(sft_dir) and any(common.last_step(os.path.join(sft_dir, t)) is not None
                                           for t in os.listdir(sft_dir))):
        print(f"no sft checkpoint in {base}: building the small pipeline first", flush=True)
        t0 = time.time()
        for args in PIPELINE:
            if args[0] == "data/tinyworld.py" and os.path.exists(os.path.join(base, "data", "tinyworld", "meta.json")):
                continue
            if args[0] == "tokenizer.py" and os.path.exists(os.path.join(base, "tokenizer", "tokenizer.json")):
                continue
            run(args)
        print(f"pipeline built in {(time.time() - t0) / 60:.1f} min", flush=True)
    t0 = time.time()
    run(RL + sys.argv[1:])
    wall = (time.time() - t0) / 60
    with open(os.path.join(base, "report", "rl.json")) as f:
        report = json.load(f)
    history, metrics = report["history"], report["metrics"]
    result = {"pass1_sft": history["pass1"][0][1], "pass1_rl": history["pass1"][-1][1],
              "minutes": metrics["train_minutes"], "wall_minutes": wall}
    for key in ("greedy_pass1", f"pass{report['config']['eval_samples']}"):
        if key in history:
            result[f"{key}_sft"], result[f"{key}_rl"] = history[key][0][1], history[key][-1][1]
    result["steps"] = history["pass1"][-1][0]
    print(json.dumps(result))
