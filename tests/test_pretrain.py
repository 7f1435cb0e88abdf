"""pretrain.py: the learning-rate schedule on hand-computed values; end to end on a tiny model: exact resume after
kill -9 (with the schedule the loop applied), DDP == one process, two nodes, bad input."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import pretrain
from conftest import REPO, run_main, run_script

TINY = ["--depth=1", "--aspect_ratio=32", "--head_dim=16", "--max_seq_len=64", "--device_batch_size=2",
        "--dtype=float32", "--eval_tokens=256", "--seed=7"]


def losses(stdout):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ \| loss ([\d.]+)", stdout)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lr_multiplier_warmup_flat_warmdown(monkeypatch):
    # 100 steps: warmup over the first 10, flat to step 80, then linear to final_lr_frac 0.1 at step 100
    monkeypatch.setattr(pretrain, "warmup_ratio", 0.1)
    monkeypatch.setattr(pretrain, "warmdown_ratio", 0.2)
    monkeypatch.setattr(pretrain, "final_lr_frac", 0.1)
    expected = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 50: 1.0, 80: 1.0, 81: 0.955, 90: 0.55, 99: 0.145, 100: 0.1}
    assert {step: pytest.approx(pretrain.lr_multiplier(step, 100)) for step in expected} == expected


def lr_schedule(stdout):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ \| .* \| lr x([\d.]+)", stdout)}


def test_kill9_then_resume_reproduces_the_uninterrupted_run(world, tmp_path):
    args = ["python", "pretrain.py"] + TINY + ["--total_batch_size=256", "--num_iterations=14", "--eval_every=7",
                                              "--save_every=3"]
    full_out = run_script(args + ["--model_tag=full"], world).stdout
    full = losses(full_out)
    assert sorted(full) == list(range(1, 15))
    assert full[14] < full[1]  # it learns
    # the default schedule the loop applied (warmdown_ratio 0.2: the last round(2.8) = 3 steps decay to 0); a line
    # is logged after its step, so line s shows the multiplier of step s - 1
    assert lr_schedule(full_out) == {**dict.fromkeys(range(1, 13), 1.0), 13: 0.667, 14: 0.333}

    # the same run, killed with SIGKILL as soon as step 8 is logged, then resumed
    env = dict(os.environ, PICOCHAT_DIR=world, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable] + args[1:] + ["--model_tag=killed"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    for line in proc.stdout:
        seen += line
        if line.startswith("step 00008/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = run_script(args + ["--model_tag=killed", "--resume=1"], world).stdout
    # the process runs on while we read its output, so the kill lands anywhere after step 8, maybe mid-save
    start = int(re.search(r"resumed from .* at step (\d+)", resumed).group(1))
    assert start in (6, 9, 12)
    after = losses(resumed)
    assert sorted(after) == list(range(start + 1, 15))
    for step, value in after.items():
        assert value == full[step], f"step {step}: resumed {value} != uninterrupted {full[step]}"


def test_two_ranks_equal_one_process_with_twice_the_accumulation(world):
    # --device=cpu (gloo): two ranks need two GPUs, and the 1-process reference must run where the ranks do
    common_args = TINY + ["--total_batch_size=256", "--num_iterations=4", "--eval_every=0", "--device=cpu"]
    single = losses(run_script(["python", "pretrain.py"] + common_args + ["--model_tag=one"], world).stdout)
    ddp = losses(run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "pretrain.py"] + common_args + ["--model_tag=two"], world).stdout)
    assert sorted(single) == sorted(ddp) == [1, 2, 3, 4]
    for step in single:
        assert ddp[step] == pytest.approx(single[step], rel=1e-4, abs=1e-5)


def test_two_nodes_on_localhost_train_in_lockstep(world):
    common_args = TINY + ["--total_batch_size=256", "--num_iterations=3", "--eval_every=0", "--device=cpu"]
    single = losses(run_script(["python", "pretrain.py"] + common_args + ["--model_tag=one"], world).stdout)
    port = free_port()
    env = dict(os.environ, PICOCHAT_DIR=world, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "pretrain.py"] + common_args + ["--model_tag=nodes"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    try:
        outs = [n.communicate(timeout=240)[0] for n in nodes]
    finally:  # a node still running when the other failed would hold its rendezvous and the cores: end and reap it
        for n in nodes:
            if n.poll() is None:
                n.kill()
                n.wait()
    assert [n.returncode for n in nodes] == [0, 0], outs
    two = losses(outs[0])
    assert sorted(two) == [1, 2, 3]
    for step in single:
        assert two[step] == pytest.approx(single[step], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--depth=0"], "depth"),
    (["--total_batch_size=100"], "is not a multiple of device_batch_size * max_seq_len * world_size = 128"),
    (["--data=/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["--dtype=float16"], "--dtype must be bfloat16 or float32"),
])
def test_bad_input_is_one_clear_error(world, extra, message):
    r = run_script(["python", "pretrain.py"] + TINY + ["--num_iterations=1"] + extra, world, check=False)
    assert r.returncode != 0 and message in r.stderr
    assert "Traceback" not in r.stderr


def test_resuming_a_checkpoint_of_another_config_is_refused(world):
    run_script(["python", "pretrain.py"] + TINY + ["--num_iterations=1", "--eval_every=0", "--model_tag=x"], world)
    r = run_script(["python", "pretrain.py"] + TINY + ["--num_iterations=2", "--eval_every=0", "--model_tag=x",
                                                       "--aspect_ratio=16", "--resume=1"], world, check=False)
    assert r.returncode != 0 and "of another model config" in r.stderr and "Traceback" not in r.stderr


def test_a_diverging_run_stops_at_once_and_saves_nothing(world, one_thread, monkeypatch, capsys):
    args = TINY + ["--device=cpu", "--total_batch_size=256", "--eval_every=0", "--model_tag=x"]
    run_main(monkeypatch, "pretrain.py", *args, "--num_iterations=2")  # a good checkpoint at step 2
    d = os.path.join(world, "checkpoints", "base", "x")
    files = {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}
    # an embedding lr of 1e39 is finite, but the update it makes is not (float32 ends at 3.4e38)
    diverge = args + ["--num_iterations=6", "--resume=1", "--embedding_lr=1e39"]
    with pytest.raises(SystemExit) as e:  # step 3's update makes the weights inf, so step 4's loss is nan
        run_main(monkeypatch, "pretrain.py", *diverge)
    assert str(e.value).startswith("error: step 4: the run diverged (the loss is nan") and "\n" not in str(e.value)
    assert "Try lower learning rates (--matrix_lr, --embedding_lr, --unembedding_lr)" in str(e.value)
    with pytest.raises(SystemExit, match="^error: step 3: the model's weights are not finite"):
        run_main(monkeypatch, "pretrain.py", *diverge, "--save_every=1")  # a save comes first: it is refused
    # neither run saved or pruned anything: step 2 is still the latest, as it was
    assert {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)} == files
    assert "step 00003/00006" in capsys.readouterr().out
