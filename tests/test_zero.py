"""--zero levels (common.parallelize): 2 gloo ranks on 127.0.0.1 at each level train as 1 process with twice the
accumulation, hold half the optimiser state, resume exactly, and resume on another number of ranks; pretrain.py
killed with SIGKILL at --zero=3 resumes exactly; rl.py at --zero=3 with ranks of unequal work.
Run under torchrun, this file is the ranks' side of the first test (ranks_main)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import common
from conftest import REPO, run_script
from model import GPT, config_from_depth, generate
from test_pretrain import TINY, free_port, losses
from test_rl import sft_model  # noqa: F401  (a fixture)

STEPS, SAVE_AT, MICRO_BATCHES = 10, 5, 4  # micro-batches per step over all ranks


def make_model():
    torch.manual_seed(0)
    # two blocks (same-shape matrices to deal out, two FSDP units) and norm gains (1-D tensors to shard)
    model = GPT(config_from_depth(2, 64, 16, aspect_ratio=16, head_dim=8, norm_weight=True))
    model.init_weights()
    return model


def train(model, optimizers, steps, rank, world_size, ckpt_dir=None):
    """The mean loss of each step, each rank taking its share of the step's micro-batches; saves at SAVE_AT."""
    mine = MICRO_BATCHES // world_size
    history = []
    for step in steps:
        tokens = torch.randint(0, 64, (MICRO_BATCHES, 2, 17), generator=torch.Generator().manual_seed(step))
        loss_sum = 0.0
        for x in tokens[rank * mine:(rank + 1) * mine]:  # (B, T+1)
            loss = model(x[:, :-1], x[:, 1:])
            (loss / mine).backward()
            loss_sum += loss.item()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        history.append(common.all_sum({"loss": loss_sum / mine}, "cpu")["loss"] / world_size)
        if ckpt_dir and step + 1 == SAVE_AT:
            common.save_stage(ckpt_dir, SAVE_AT, model, optimizers, rank, {"history": history})
    return history


def resume(zero, ckpt_dir, rank, world_size):
    model = make_model()
    optimizers = common.parallelize(model, zero)
    step, _, _ = common.resume_stage(True, ckpt_dir, model, optimizers, rank, "cpu", {}, history=None)
    assert step == SAVE_AT
    return train(model, optimizers, range(step, STEPS), rank, world_size), model


def ranks_main(out):
    _, rank, _, world_size, _ = common.setup_device("cpu")
    torch.set_num_threads(1)
    results = {}
    for zero in range(4):
        model = make_model()
        optimizers = common.parallelize(model, zero)
        ckpt_dir = os.path.join(out, f"zero{zero}")
        history = train(model, optimizers, range(STEPS), rank, world_size, ckpt_dir)
        with open(os.path.join(ckpt_dir, f"meta_{SAVE_AT:06d}.json")) as f:
            held = json.load(f)["optimizer_state_bytes"]
        results[zero] = {"losses": history, "resumed": resume(zero, ckpt_dir, rank, world_size)[0], "held": held}
    # another number of ranks: the 1-process checkpoint resumed at --zero=3
    results["from_one"], model = resume(3, os.path.join(out, "one"), rank, world_size)
    with common.unsharded(model):  # the sharded model, rank 0 alone generating: no collective may be left waiting
        if rank == 0:
            results["generated"] = len(list(generate(model, [[1, 2, 3]], 4, temperature=0.0)))
    if rank == 0:
        common.atomic_write_text(os.path.join(out, "results.json"), json.dumps(results))
    common.teardown()


def test_each_level_on_2_ranks_trains_as_1_process_and_resumes_on_any_number(tmp_path):
    # the reference: 1 process, all micro-batches of a step, and its checkpoint at SAVE_AT for the ranks to resume
    model = make_model()
    optimizers = common.parallelize(model, 0)
    reference = train(model, optimizers, range(STEPS), 0, 1, str(tmp_path / "one"))
    whole = common.optimizer_state_bytes(optimizers)
    run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.abspath(__file__), str(tmp_path)], tmp_path)
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    # rel=1e-4: the ranks' sums round differently, and bf16 orthogonalisation (on AMX CPUs) amplifies that to ~1e-4
    # over 10 steps at these learning rates
    for zero in "0123":
        r = results[zero]
        assert r["losses"] == pytest.approx(reference, rel=1e-4), zero
        assert r["resumed"] == r["losses"][SAVE_AT:], zero  # exact
        if zero != "0":
            assert all(abs(held - whole / 2) < 0.01 * whole for held in r["held"]), (zero, r["held"], whole)
    # level 0 keeps AdamW's moments on every rank (Muon's were always split by matrix)
    assert min(results["0"]["held"]) > 1.2 * max(results["1"]["held"])
    assert results["from_one"] == pytest.approx(reference[SAVE_AT:], rel=1e-4)
    assert results["generated"] == 4
    # and the other way: 1 process resumes the 2 ranks' --zero=2 checkpoint
    assert resume(2, str(tmp_path / "zero2"), 0, 1)[0] == pytest.approx(reference[SAVE_AT:], rel=1e-4)


def start_ranks(args, base_dir):
    """`python ARGS` as 2 ranks, with the environment torchrun gives them (without its launcher process: faster)."""
    port = free_port()
    return [subprocess.Popen([sys.executable] + args, cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT,
                             env=dict(os.environ, PICOCHAT_DIR=base_dir, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                                      PYTHONPATH=REPO, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in range(2)]


def run_ranks(args, base_dir):
    """Rank 0's output of `python ARGS` as 2 ranks."""
    ranks = start_ranks(args, base_dir)
    outs = [proc.communicate(timeout=300)[0] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], "\n".join(out[-3000:] for out in outs)
    return outs[0]


def test_pretrain_killed_at_zero3_resumes_exactly_and_on_one_process(world):
    args = ["pretrain.py"] + TINY + ["--total_batch_size=256", "--num_iterations=12", "--eval_every=6",
                                     "--save_every=3", "--zero=3"]
    full = losses(run_ranks(args + ["--model_tag=full"], world))
    assert sorted(full) == list(range(1, 13))

    # the same run, both ranks killed with SIGKILL once step 8 is logged
    ranks = start_ranks(args + ["--model_tag=killed"], world)
    for line in ranks[0].stdout:
        if line.startswith("step 00008/"):
            break
    for proc in ranks:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert [proc.returncode for proc in ranks] == [-signal.SIGKILL] * 2
    ckpt_dir = os.path.join(world, "checkpoints", "base")
    shutil.copytree(os.path.join(ckpt_dir, "killed"), os.path.join(ckpt_dir, "one"))

    resumed = run_ranks(args + ["--model_tag=killed", "--resume=1"], world)
    # the ranks run on while we read, so the kill lands anywhere after step 8, maybe mid-save
    start = int(re.search(r"resumed from .* at step (\d+)", resumed).group(1))
    assert start in (6, 9)
    after = losses(resumed)
    assert sorted(after) == list(range(start + 1, 13))
    assert all(after[step] == full[step] for step in after), (after, full)  # exact
    # the same checkpoint on 1 process: the data position and the states re-sharded
    alone = losses(run_script(["python"] + args + ["--model_tag=one", "--resume=1"], world).stdout)
    assert sorted(alone) == list(range(start + 1, 13))
    assert all(alone[step] == pytest.approx(full[step], rel=1e-4) for step in alone)


def test_rl_at_zero3_with_ranks_of_unequal_work(sft_model, world, tmp_path):
    """rank 1's answers are all graded wrong, so it has no rows to train on and runs blank passes to keep up with
    rank 0's (each forward/backward is a collective at --zero=3); sampling and evaluation run unsharded."""
    launcher = tmp_path / "rl_unequal.py"
    launcher.write_text(
        "import os, runpy\n"
        "import data.grade\n"
        "data.grade.grade = lambda text, reference: os.environ['RANK'] == '0' and len(text) % 2 == 0\n"
        "runpy.run_path('rl.py', run_name='__main__')\n")
    out = run_ranks([str(launcher), "--device=cpu", "--dtype=float32", "--max_new_tokens=12", "--prompts_per_step=2",
                     "--num_samples=4", "--eval_problems=2", "--eval_samples=2", "--num_steps=2", "--eval_every=2",
                     "--device_batch_size=2", "--ppo_epochs=2", "--zero=3"], world)
    with open(os.path.join(world, "report", "rl.json")) as f:
        report = json.load(f)
    assert [s for s, _ in report["history"]["reward"]] == [1, 2] and report["history"]["pass1"][-1][0] == 2
    state, _, meta = common.load_checkpoint(os.path.join(world, "checkpoints", "rl", "tiny"), 2, load_rank_state=False)
    assert meta["world_size"] == 2 and any(not torch.equal(state[k], sft_model[k]) for k in sft_model), out[-2000:]


if __name__ == "__main__":
    ranks_main(sys.argv[1])
