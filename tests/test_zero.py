"""--zero levels (common.parallelize): 2 gloo ranks on 127.0.0.1 at each level train as 1 process with twice the
accumulation, hold half the optimiser state, resume exactly, and resume on another number of ranks, with pretraining's
optimisers (AdamW + Muon) and with an open model's (AdamW on every weight); pretrain.py killed with SIGKILL at
--zero=3 resumes exactly; rl.py at --zero=3 with ranks of unequal work; sft.py with LoRA resumed at --zero=3
saves the adapters alone.
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
from conftest import REPO, run_script, save_random_model
from model import GPT, config_from_depth, generate
from test_pretrain import TINY, free_port, losses
from test_rl import sft_model  # noqa: F401  (a fixture)

STEPS, SAVE_AT, MICRO_BATCHES = 10, 5, 4  # micro-batches per step over all ranks
# the runs on 2 ranks: name -> (--zero, optimizer); "adamw" is how open models are fine-tuned (--optimizer=adamw)
RUNS = {"0": (0, "muon"), "1": (1, "muon"), "2": (2, "muon"), "3": (3, "muon"),
        "adamw1": (1, "adamw"), "adamw2": (2, "adamw"), "adamw3": (3, "adamw")}


def build(zero, optimizer="muon"):
    """The test model and its optimisers at --zero. "muon": pretraining's (AdamW + Muon); "adamw": a fine-tuning
    stage's for an open model (stage_optimizers: AdamW on every weight, ZeroAdamW at 1-2), on a model whose head is
    its embedding, as Qwen3-0.6B's."""
    torch.manual_seed(0)
    # two blocks (same-shape matrices to deal out, two FSDP units) and norm gains (1-D tensors to shard)
    model = GPT(config_from_depth(2, 64, 16, aspect_ratio=16, head_dim=8, norm_weight=True,
                                  tie_embeddings=optimizer == "adamw"))
    model.init_weights()
    if optimizer == "adamw":
        return model, common.stage_optimizers(model, zero, "adamw", lr=3e-3, lr_scale=1.0, weight_decay=0.1,
                                              open_model=True)
    return model, common.parallelize(model, zero)


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


def resume(zero, ckpt_dir, rank, world_size, optimizer="muon"):
    model, optimizers = build(zero, optimizer)
    step, _, _ = common.resume_stage(True, ckpt_dir, model, optimizers, rank, "cpu", {}, history=None)
    assert step == SAVE_AT
    return train(model, optimizers, range(step, STEPS), rank, world_size), model


def ranks_main(out):
    _, rank, _, world_size, _ = common.setup_device("cpu")
    torch.set_num_threads(1)
    results = {}
    for name, (zero, optimizer) in RUNS.items():
        model, optimizers = build(zero, optimizer)
        ckpt_dir = os.path.join(out, f"zero{name}")
        history = train(model, optimizers, range(STEPS), rank, world_size, ckpt_dir)
        with open(os.path.join(ckpt_dir, f"meta_{SAVE_AT:06d}.json")) as f:
            held = json.load(f)["optimizer_state_bytes"]
        results[name] = {"losses": history, "resumed": resume(zero, ckpt_dir, rank, world_size, optimizer)[0],
                         "held": held}
    # another number of ranks: the 1-process checkpoint resumed at --zero=3
    results["from_one"], model = resume(3, os.path.join(out, "muon"), rank, world_size)
    with common.unsharded(model):  # the sharded model, rank 0 alone generating: no collective may be left waiting
        if rank == 0:
            results["generated"] = len(list(generate(model, [[1, 2, 3]], 4, temperature=0.0)))
    if rank == 0:
        common.atomic_write_text(os.path.join(out, "results.json"), json.dumps(results))
    common.teardown()


def test_each_level_on_2_ranks_trains_as_1_process_and_resumes_on_any_number(tmp_path):
    # the reference: 1 process, all micro-batches of a step, and its checkpoint at SAVE_AT for the ranks to resume
    references, whole = {}, {}
    for optimizer in ("muon", "adamw"):
        model, optimizers = build(0, optimizer)
        references[optimizer] = train(model, optimizers, range(STEPS), 0, 1, str(tmp_path / optimizer))
        whole[optimizer] = common.optimizer_state_bytes(optimizers)
    reference = references["muon"]
    run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.abspath(__file__), str(tmp_path)], tmp_path)
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    # rel=1e-4: the ranks' sums round differently, and bf16 orthogonalisation (on AMX CPUs) amplifies that to ~1e-4
    # over 10 steps at these learning rates (measured: 1.3e-4 absolute on losses of 4.2; 2.4e-7 with Muon in fp32,
    # and AdamW alone 7e-7)
    for name, (zero, optimizer) in RUNS.items():
        r = results[name]
        assert r["losses"] == pytest.approx(references[optimizer], rel=1e-4), name
        assert r["resumed"] == r["losses"][SAVE_AT:], name  # exact
        if zero:
            assert all(abs(held - whole[optimizer] / 2) < 0.01 * whole[optimizer] for held in r["held"]), \
                (name, r["held"], whole[optimizer])
    # level 0 keeps AdamW's moments on every rank (Muon's were always split by matrix)
    assert min(results["0"]["held"]) > 1.2 * max(results["1"]["held"])
    assert results["from_one"] == pytest.approx(reference[SAVE_AT:], rel=1e-4)
    assert results["generated"] == 4
    # and the other way: 1 process resumes the 2 ranks' --zero=2 checkpoint
    assert resume(2, str(tmp_path / "zero2"), 0, 1)[0] == pytest.approx(reference[SAVE_AT:], rel=1e-4)
    assert (resume(2, str(tmp_path / "zeroadamw2"), 0, 1, "adamw")[0]
            == pytest.approx(references["adamw"][SAVE_AT:], rel=1e-4))


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


# slow: test_each_level_on_2_ranks... covers resuming at --zero=3 exactly (a save, then a resume in-process); this
# one adds the SIGKILL through pretrain.py's own loop (~40 s on 2 cores)
@pytest.mark.slow
def test_pretrain_killed_at_zero3_resumes_exactly_and_on_one_process(world):
    args = ["pretrain.py"] + TINY + ["--total_batch_size=256", "--num_iterations=12", "--eval_every=6",
                                     "--save_every=3", "--zero=3", "--device=cpu"]  # gloo: any GPU count
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


def test_sft_lora_at_zero3_resumes_one_process_and_saves_the_adapters_alone(world):
    """--zero=3 shards the frozen base and the adapters alike: 2 ranks resume a 1-process LoRA run (each rank takes
    its slices of the saved adapters), and their checkpoint holds the adapters alone, whole, as the 1-process run's
    next step."""
    from tokenizer import load_tokenizer
    save_random_model("base", config_from_depth(1, load_tokenizer().vocab_size, 64, aspect_ratio=64, head_dim=32))
    args = ["sft.py", "--device=cpu", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
            "--dtype=float32", "--eval_every=0", "--num_iterations=2", "--save_every=1", "--lora_rank=4"]
    run_script(["python"] + args, world)
    ckpt_dir = os.path.join(world, "checkpoints", "sft", "tiny")
    alone, _, _ = common.load_checkpoint(ckpt_dir, 2, load_rank_state=False)
    os.remove(os.path.join(ckpt_dir, "meta_000002.json"))
    assert "at step 1" in run_ranks(args + ["--zero=3", "--resume=1"], world)
    sharded, _, meta = common.load_checkpoint(ckpt_dir, 2, load_rank_state=False)
    assert meta["world_size"] == 2 and sharded.keys() == alone.keys()
    assert len(sharded) == 2 * 6 and all(k.endswith((".lora_A", ".lora_B")) for k in sharded)  # 6 layers' A and B
    assert any(sharded[k].abs().sum() > 0 for k in sharded if k.endswith("lora_B"))  # trained
    assert all(torch.allclose(sharded[k], alone[k], atol=1e-6) for k in sharded)

if __name__ == "__main__":
    ranks_main(sys.argv[1])
