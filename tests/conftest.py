"""Shared test fixtures. Tests never touch ~/.cache/picochat: every test gets its own $PICOCHAT_DIR."""
import os
import runpy
import sys
import time

# The suite is defined on the CPU (exact figures, gloo, the interpreter for Triton): on a machine with a GPU it is
# hidden from the tests and from the stage scripts they start (CUDA reads this at its first use, after this line).
# PICOCHAT_TEST_GPU=1 runs them on the GPU instead, as tests/gpu_checks.sh does.
if os.environ.get("PICOCHAT_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import common  # noqa: E402

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

    from model import GPT
    from tokenizer import load_tokenizer
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    meta = {"step": 1, "model_config": dataclasses.asdict(config), "tokenizer_hash": load_tokenizer().hash}
    common.save_checkpoint(common.checkpoint_dir(stage, tag), 1, model.state_dict(), None, meta)
    return model


# -----------------------------------------------------------------------------
# Two gloo ranks in spawned processes: the DDP tests. Teardown is where such tests go flaky, so:
# - the rendezvous is a file the test owns (no port picked in advance that another process can take, no rank hosting
#   a store the other still needs);
# - both ranks pass a barrier before they leave (destroy_process_group is not collective: without it one rank tears
#   down while the other still has a collective in flight);
# - each rank destroys its process group on every path, an exception's too;
# - the group is made by common.init_process_group, as the stages make theirs: gloo threads left alive after
#   destroy_process_group abort a process at exit (seen once in a loaded CI run; see there why);
# - each rank then checks that no gloo thread is left, so that a torch which leaks them again fails here every time
#   instead of aborting now and then.


def gloo_ranks(tmp_path, fn, *args, timeout=120):
    """Run fn(rank, *args) on two gloo ranks (spawned processes, one thread each, the process group set up and torn
    down around it). fn: a module-level function (the processes import it). Fails the test on an error or a signal in
    either rank (its traceback), or when they are not done within `timeout` seconds."""
    ranks = mp.spawn(_gloo_rank, args=(str(tmp_path / "gloo_store"), fn, args), nprocs=2, join=False)
    deadline = time.time() + timeout
    while not ranks.join(timeout=1):
        if time.time() > deadline:
            for p in ranks.processes:
                p.kill()
                p.join()
            pytest.fail(f"the ranks hung (not done within {timeout} s)")


def _gloo_rank(rank, store_path, fn, args):
    common.init_process_group(backend="gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    left = gloo_threads()
    assert not left, f"gloo threads outlived destroy_process_group: {left}"


def gloo_threads(wait=10):
    """The names of this process's gloo threads (Linux; none elsewhere) once none is left or `wait` seconds have
    passed: a joined thread can stay listed for a moment."""
    deadline = time.time() + wait
    while (names := _gloo_thread_names()) and time.time() < deadline:
        time.sleep(0.05)
    return names


def _gloo_thread_names():
    tasks = "/proc/self/task"
    names = []
    for tid in os.listdir(tasks) if os.path.isdir(tasks) else []:
        try:
            with open(os.path.join(tasks, tid, "comm")) as f:
                name = f.read().strip()
        except OSError:  # a thread that ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return names
