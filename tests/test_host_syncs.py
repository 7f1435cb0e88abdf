"""The training loops read the device once per optimisation step, never once per micro-batch. On a GPU every host
read of a tensor (.item(), .tolist(), float(), int(), bool(), .numpy()) waits for the whole queue of kernels; here
each read is counted while pretrain.py, sft.py, rl.py and dpo.py run steps of several micro-batches each.
The count per step is the difference between a run of 3 steps and one of 1 step, so setup, checkpoints and the
report (once per run) cancel out. Reads inside model.generate are not counted: sampling is host-driven by nature
(each token decides stops and calculator calls)."""
import contextlib
import sys

import pytest
import torch

import model
from conftest import run_main
from test_rl import run_rl, sft_model  # noqa: F401  (sft_model: a fixture)

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting_reads(monkeypatch):
    """Count host reads of tensors outside model.generate; yields a dict {"reads": n, "sites": {file:line: n}}."""
    counts = {"reads": 0, "sites": {}}

    def wrap(original):
        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            site = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            while frame is not None:
                if frame.f_code.co_name == "generate" and frame.f_code.co_filename == model.__file__:
                    return original(self, *args, **kwargs)
                frame = frame.f_back
            counts["reads"] += 1
            counts["sites"][site] = counts["sites"].get(site, 0) + 1
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, wrap(getattr(torch.Tensor, name)))
        yield counts


def reads_per_step(monkeypatch, run, steps_flag):
    """Host reads per optimisation step: run(steps=3) minus run(steps=1), halved."""
    totals = {}
    for steps in (1, 3):
        with counting_reads(monkeypatch) as counts:
            run(f"--{steps_flag}={steps}")
        totals[steps] = counts
    per_step = (totals[3]["reads"] - totals[1]["reads"]) / 2
    return per_step, totals[3]["sites"]


PRETRAIN = ["--depth=1", "--aspect_ratio=32", "--head_dim=16", "--max_seq_len=64", "--device_batch_size=2",
            "--total_batch_size=512", "--dtype=float32", "--eval_every=0", "--seed=7"]  # 4 micro-batches a step


def test_pretrain_and_sft_read_the_device_once_per_step(world, monkeypatch, one_thread):
    per_step, sites = reads_per_step(monkeypatch, lambda n: run_main(monkeypatch, "pretrain.py", *PRETRAIN, n),
                                     "num_iterations")
    assert per_step == 1, f"pretrain: {per_step} host reads per step (4 micro-batches); sites {sites}"
    sft = ["--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=384", "--dtype=float32",
           "--eval_every=0"]  # 3 micro-batches a step
    per_step, sites = reads_per_step(monkeypatch, lambda n: run_main(monkeypatch, "sft.py", *sft, n),
                                     "num_iterations")
    assert per_step == 1, f"sft: {per_step} host reads per step (3 micro-batches); sites {sites}"


def test_rl_and_dpo_read_the_device_once_per_optimiser_step(sft_model, monkeypatch):
    # GRPO: 2 prompts x 4 answers in micro-batches of 2, two optimiser steps (PPO epochs) per step. Besides the one
    # read per optimiser step, the step reads the advantages once: computed on the host from the graded answers
    # (tensors that never were on the device), so no sync.
    rl = ["--device_batch_size=2", "--ppo_epochs=2", "--eval_every=0", "--kl_coef=0.1"]
    per_step, sites = reads_per_step(monkeypatch, lambda n: run_rl(monkeypatch, *rl, n), "num_steps")
    assert per_step == 2 + 1, f"rl: {per_step} host reads per step; sites {sites}"
    # DPO: 2 pairs a step in micro-batches of 1 (chosen and rejected: 4 forward/backward passes)
    per_step, sites = reads_per_step(monkeypatch, lambda n: run_rl(monkeypatch, "--dpo_problems=4",
                                                                   "--device_batch_size=1", "--eval_every=0", n,
                                                                   script="dpo.py"), "num_steps")
    assert per_step == 1, f"dpo: {per_step} host reads per step; sites {sites}"


def test_bits_per_byte_reads_the_device_once(monkeypatch):
    from data.loader import evaluate_bpb
    torch.manual_seed(0)
    gpt = model.GPT(model.config_from_depth(1, 64, 16, aspect_ratio=32, head_dim=16))
    gpt.init_weights()
    batches = [(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))) for _ in range(3)]
    token_bytes = torch.randint(0, 4, (64,))
    with counting_reads(monkeypatch) as counts:
        bpb = evaluate_bpb(gpt, batches, token_bytes, contextlib.nullcontext())
    assert counts["reads"] == 1, counts["sites"]
    # the same number as summing on the host
    nats = sum((gpt(x, y, loss_reduction="none") * (token_bytes[y] > 0)).sum().item() for x, y in batches)
    nbytes = sum(token_bytes[y].sum().item() for _, y in batches)
    assert bpb == pytest.approx(nats / (nbytes * torch.log(torch.tensor(2.0)).item()), rel=1e-5)
