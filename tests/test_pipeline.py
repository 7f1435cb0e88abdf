"""speedrun.sh end to end with the smoke preset: every stage runs, the report card is written, and a run that is
interrupted and started again skips what was finished instead of redoing it."""
import json
import os
import signal
import subprocess

from conftest import REPO


def speedrun(base_dir, stop_at=None):
    """Run `PRESET=smoke bash speedrun.sh`; with stop_at, interrupt it (SIGINT, like Ctrl-C) when that line shows."""
    env = dict(os.environ, PICOCHAT_DIR=str(base_dir), PRESET="smoke", OMP_NUM_THREADS="1")
    # SIGINT at its default in the run: a suite started in the background (`cmd &`) passes SIGINT down ignored,
    # and a shell that starts with a signal ignored can never be interrupted by it
    proc = subprocess.Popen(["bash", "speedrun.sh"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = ""
    for line in proc.stdout:
        out += line
        if stop_at and line.startswith(stop_at):
            os.killpg(proc.pid, signal.SIGINT)
            break
    proc.wait(timeout=600)
    return proc.returncode, out


def test_smoke_pipeline_runs_every_stage_and_resumes_after_an_interrupt(tmp_base_dir):
    code, out = speedrun(tmp_base_dir, stop_at="== sft")
    assert code != 0, out[-2000:]
    assert os.path.exists(os.path.join(tmp_base_dir, "report", "base.seconds"))  # pretraining had finished
    assert not os.path.exists(os.path.join(tmp_base_dir, "report", "sft.seconds"))

    code, out = speedrun(tmp_base_dir)
    assert code == 0, out[-3000:]
    assert "== tokenizer: done before, skipping" in out and "== base: done before, skipping" in out
    for stage in ("== sft", "== rl", "== eval"):
        assert f"\n{stage}\n" in out
    summary = json.loads(out.strip().splitlines()[-1])  # the last line is the run's JSON summary
    assert set(summary) == {"total_min", "tokenizer_min", "pretrain_min", "sft_min", "rl_min", "eval_min", "bpb",
                            "pass1_sft", "pass1_rl", "bpb_sft", "bpb_rl", "chat_sft", "chat_rl"}
    report = open(os.path.join(tmp_base_dir, "report", "report.md")).read()
    assert "| metric | base | sft | rl |" in report and report.count("<svg") >= 3
    # even 20 smoke steps take the base model below the unigram baseline
    eval_base = json.load(open(os.path.join(tmp_base_dir, "report", "eval_base.json")))
    assert summary["bpb"] < eval_base["results"]["bpb"]["unigram_bpb"]
