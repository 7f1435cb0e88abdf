"""Shared test fixtures. Tests never touch ~/.cache/picochat: every test gets its own $PICOCHAT_DIR."""
import os
import runpy
import sys

# The suite is defined on the CPU (exact figures, gloo, the interpreter for Triton): on a machine with a GPU it is
# hidden from the tests and from the stage scripts they start (CUDA reads this at its first use, after this line).
# PICOCHAT_TEST_GPU=1 runs them on the GPU instead, as tests/gpu_checks.sh does.
if os.environ.get("PICOCHAT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture(autouse=True)
def tmp_base_dir(tmp_path, monkeypatch):
    """Point $PICOCHAT_DIR at a fresh temporary folder (autouse: no test can write the user's cache)."""
    base = tmp_path / "picochat"
    base.mkdir()
    monkeypatch.setenv("PICOCHAT_DIR", str(base))
    return str(base)


@pytest.fixture
def hub(monkeypatch):
    """A loopback Hugging Face hub (tests/loopback_hub.py), with $HF_ENDPOINT and $HF_DATASETS_SERVER pointing at it
    for this process and the scripts it runs."""
    from loopback_hub import Hub
    h = Hub()
    monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
    monkeypatch.setenv("HF_DATASETS_SERVER", h.datasets_server)
    yield h
    h.close()


def shared_data(name):
    """Path of a file in ../shared/data, or skip the test when it is absent."""
    path = os.path.join(SHARED_DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    return path


def run_script(args, base_dir, timeout=300, check=True, env_extra=None):
    """Run a repo script (or module/launcher args) as a user would, with $PICOCHAT_DIR=base_dir."""
    import subprocess
    import sys
    env = dict(os.environ, PICOCHAT_DIR=str(base_dir), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO)
    env.update(env_extra or {})
    cmd = args if args[0] != "python" else [sys.executable] + args[1:]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


# A tiny prepared world: small built-in data and a 400-token tokenizer, made once per session with the real
# command lines, then copied into each test's $PICOCHAT_DIR.
TINY_WORLD = ["--pretrain_mb=0.3", "--num_chat=400", "--num_math_train=400", "--num_math_test=40",
              "--num_mc_train=100", "--num_mc_test=40", "--num_probe_train=50", "--num_probe_test=30"]


@pytest.fixture(scope="session")
def _prepared_world(tmp_path_factory):
    base = tmp_path_factory.mktemp("world")
    run_script(["python", "data/tinyworld.py"] + TINY_WORLD, base)
    run_script(["python", "tokenizer.py", "--vocab_size=400", "--max_chars=300000"], base)
    return base


@pytest.fixture
def world(_prepared_world, tmp_base_dir):
    import shutil
    shutil.copytree(_prepared_world, tmp_base_dir, dirs_exist_ok=True)
    return tmp_base_dir


@pytest.fixture
def one_thread():
    """Tiny models only lose time to OpenMP threads on a busy machine (many times slower); and the thread count
    setup_device picks must not outlive a script run in this process."""
    import torch
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    set_threads(1)
    torch.set_num_threads = lambda n: None
    yield
    torch.set_num_threads = set_threads
    set_threads(threads)


def run_main(monkeypatch, script, *args):
    """`python SCRIPT ARGS`, run in this process: the interpreter and torch are already up (seconds saved)."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(os.path.join(REPO, script), run_name="__main__")


def save_random_model(stage, config, tag="tiny"):
    """A random GPT of `config` (seed 0) saved as step 1 of `stage`'s checkpoint under `tag`, with the prepared
    tokenizer's hash, as a stage would have saved it: what a later stage's test starts from. Returns the model."""
    import dataclasses

    import common
    from model import GPT
    from tokenizer import load_tokenizer
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    meta = {"step": 1, "model_config": dataclasses.asdict(config), "tokenizer_hash": load_tokenizer().hash}
    common.save_checkpoint(common.checkpoint_dir(stage, tag), 1, model.state_dict(), None, meta)
    return model
