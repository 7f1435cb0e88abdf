"""The configurator, atomic writes and checkpoints of common.py."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import asdict

import pytest
import torch

import common
from conftest import REPO, gloo_ranks, run_script
from model import GPT, config_from_depth


def settings():
    return {"depth": 4, "lr": 0.02, "compile": False, "source": "base", "UPPER": 3, "_private": 1, "fn": print}


def test_configure_overrides_and_types():
    g = settings()
    config = common.configure(g, ["--depth=12", "--lr=1", "--compile=true", "--source=a=b"])
    assert g["depth"] == 12 and type(g["depth"]) is int
    assert g["lr"] == 1.0 and type(g["lr"]) is float  # an int is fine for a float
    assert g["compile"] is True
    assert g["source"] == "a=b"  # values may contain '='
    assert config == {"depth": 12, "lr": 1.0, "compile": True, "source": "a=b"}  # constants/privates/functions aren't config
    common.configure(g, ["--compile=0", "--source='quoted'"])
    assert g["compile"] is False and g["source"] == "quoted"


@pytest.mark.parametrize("arg, fragment", [
    ("--depht=3", "unknown config key 'depht'"),
    ("--depth=3.5", "--depth expects int"),
    ("--depth=True", "--depth expects int"),
    ("--lr=fast", "--lr expects float"),
    ("--compile=yes", "--compile expects a bool"),
    ("--depth", "--depth needs a value"),
    ("--UPPER=4", "unknown config key 'UPPER'"),
    ("missing_config.py", "config file 'missing_config.py' not found"),
])
def test_configure_errors_name_the_key(arg, fragment):
    with pytest.raises(SystemExit) as e:
        common.configure(settings(), [arg])
    message = str(e.value)
    assert fragment in message and "\n" not in message
    if "unknown" in fragment:
        assert "valid keys: compile, depth, lr, source" in message


def test_configure_config_file_then_flags(tmp_path):
    cfg = tmp_path / "small.py"
    cfg.write_text("depth = 6\nlr = 3\n")
    g = settings()
    common.configure(g, [str(cfg), "--depth=8"])
    assert g["depth"] == 8 and g["lr"] == 3.0
    cfg.write_text("depht = 6\n")
    with pytest.raises(SystemExit, match="unknown config key 'depht'"):
        common.configure(settings(), [str(cfg)])


def test_configure_from_the_command_line_is_one_line(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import common\ndepth = 4\nif __name__ == '__main__':\n    common.configure(globals())\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, str(script), "--depth=x"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stderr.strip() == "error: --depth expects int, got 'x'"


def test_more_ranks_on_a_node_than_gpus_stop_every_rank_with_one_line(monkeypatch):
    # e.g. torchrun --nproc_per_node=2 on a 1-GPU machine: rank 1 has no GPU, and rank 0 would wait for it forever
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(SystemExit, match=r"2 processes on this node but 1 CUDA GPUs .*--nproc_per_node=1"):
            common.setup_device("cuda")


def test_a_distributed_stage_leaves_no_gloo_thread_behind(tmp_path):
    # a stage under torchrun: setup_device, an optimizer built (it imports torch._dynamo), teardown. Threads of gloo
    # left alive meet interpreter shutdown and can abort the process (see common.init_process_group). In a fresh
    # process, since this one may have imported torch._dynamo already
    code = ("import common, conftest; from model import GPT, config_from_depth; common.setup_device('cpu'); "
            "GPT(config_from_depth(1, 64, 16, aspect_ratio=32, head_dim=16)).setup_optimizers(); "
            "common.teardown(); print(conftest.gloo_threads())")
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "0",  # port 0: the only rank hosts the store on a free port
           "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    out = run_script(["python", "-c", code], tmp_path, timeout=120, env_extra=env)
    assert out.stdout.splitlines()[-1] == "[]"


def test_a_cpu_stage_computes_the_same_gradient_every_time_when_compiled_on_two_threads(tmp_path):
    # inductor's compiled backward adds an embedding's gradient rows with atomic adds across threads, in an order
    # that changes between calls unless start_stage turns deterministic algorithms on (then this fails 1 run in 1).
    # In a fresh process: the mode and the thread count are global
    code = textwrap.dedent("""
        import torch, common
        from model import GPT, config_from_depth
        common.start_stage("cpu", "float32")
        torch.set_num_threads(2)
        model = GPT(config_from_depth(1, 64, 16, aspect_ratio=32, head_dim=16))
        step = torch.compile(lambda x, y: model(x, y))
        x, y = torch.randint(0, 64, (16, 64)), torch.randint(0, 64, (16, 64))
        grads = []
        for _ in range(5):
            model.zero_grad(set_to_none=True)
            step(x, y).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        print(all(torch.equal(grads[0], g) for g in grads[1:]))
    """)
    out = run_script(["python", "-c", code], tmp_path)
    assert out.stdout.splitlines()[-1] == "True"


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "out" / "f.txt"
    common.atomic_write_text(str(path), "old")
    with pytest.raises(RuntimeError):
        with common.atomic_path(str(path)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path / "out") == ["f.txt"]  # no temp file left behind


def test_checkpoint_roundtrip_latest_and_keep(tmp_base_dir):
    d = common.checkpoint_dir("base", "d1")
    assert common.last_step(d) is None
    for step in (10, 20, 30):
        common.save_checkpoint(d, step, {"w": torch.full((2,), float(step))}, {"pos": step}, {"step": step}, keep=2)
    assert common.last_step(d) == 30
    assert sorted(os.listdir(d)) == ["meta_000020.json", "meta_000030.json", "model_000020.pt", "model_000030.pt",
                                     "optim_000020_rank0.pt", "optim_000030_rank0.pt"]
    model_state, rank_states, meta = common.load_checkpoint(d)  # every saved rank's state: here one
    assert model_state["w"].tolist() == [30.0, 30.0] and rank_states == [{"pos": 30}] and meta == {"step": 30}
    # a step whose meta was never written (killed mid-save) does not count
    torch.save({"w": torch.zeros(2)}, os.path.join(d, "model_000040.pt"))
    assert common.last_step(d) == 30
    with pytest.raises(SystemExit, match="no checkpoint for step 40"):
        common.load_checkpoint(d, 40)
    assert json.load(open(os.path.join(d, "meta_000020.json"))) == {"step": 20}


class Killed(Exception):
    """Stands for the process dying at that point."""


def test_a_save_interrupted_after_any_file_keeps_the_previous_step(tmp_base_dir, monkeypatch):
    d = common.checkpoint_dir("base", "d1")
    common.save_checkpoint(d, 1, {"w": torch.ones(2)}, {"pos": 1}, {"step": 1})
    rename = os.replace
    # the save of step 2 dies right after its first, second, ... file lands (each file lands by its rename)
    for files_landed in range(1, 4):  # the model, this rank's state, the meta
        landed = []

        def rename_then_die(src, dst):
            rename(src, dst)
            landed.append(os.path.basename(dst))
            if len(landed) == files_landed:
                raise Killed

        monkeypatch.setattr(os, "replace", rename_then_die)
        with pytest.raises(Killed):
            common.save_checkpoint(d, 2, {"w": torch.full((2,), 2.0)}, {"pos": 2}, {"step": 2})
        monkeypatch.setattr(os, "replace", rename)
        if files_landed < 3:  # not all there: the latest complete step is still 1, and it loads whole
            assert common.last_step(d) == 1, landed
            model_state, rank_states, meta = common.load_checkpoint(d)
            assert model_state["w"].tolist() == [1.0, 1.0] and rank_states == [{"pos": 1}] and meta == {"step": 1}
    assert landed == ["model_000002.pt", "optim_000002_rank0.pt", "meta_000002.json"]  # the meta makes it a step
    assert common.last_step(d) == 2 and common.load_checkpoint(d)[0]["w"].tolist() == [2.0, 2.0]


def test_svg_chart_draws_each_series_and_skips_missing_points():
    svg = common.svg_chart({"train": [(1, 3.0), (2, 2.5), (3, None)], "val": [(2, 2.7)]}, "loss")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<polyline") == 2 and ">train<" in svg and ">val<" in svg
    assert "no data" in common.svg_chart({"x": [(1, None)]}, "empty")


def test_config_file_is_data(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("# a comment\ndepth = -2\nlr = 3\ncompile = 1\nsource = 'x=y'\n")
    g = settings()
    common.configure(g, [str(cfg)])
    assert (g["depth"], g["lr"], g["compile"], g["source"]) == (-2, 3.0, True, "x=y")
    marker = tmp_path / "ran"
    for text, fragment in [("import os\ndepth = 2\n", "line 1: only `key = value` lines"),
                           (f"depth = open({str(marker)!r}, 'w') and 2\n", "line 1: the value of depth must be a literal"),
                           (f"depht = 2\nopen({str(marker)!r}, 'w')\n", "unknown config key 'depht' in"),
                           ("lr = 1e999\n", "--lr must be a finite number, got '1e999'"),
                           ("depth = 2.5\n", "--depth expects int, got '2.5'"),
                           ("depth = (\n", "line 1: '(' was never closed")]:
        cfg.write_text(text)
        with pytest.raises(SystemExit) as e:
            common.configure(settings(), [str(cfg)])
        assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_settings_must_be_finite_and_in_range():
    for arg in ("--lr=inf", "--lr=1e999", "--lr=-1e999", "--lr=nan"):
        with pytest.raises(SystemExit, match="--lr"):
            common.configure(settings(), [arg])
    common.check_settings({"a": 1e-9, "b": 0.0, "c": 1.0}, positive=("a",), non_negative=("b",), fraction=("c",))
    with pytest.raises(SystemExit) as e:
        common.check_settings({"a": 0.0, "b": -1, "c": 1.5}, positive=("a",), non_negative=("b",), fraction=("c",))
    assert str(e.value) == "error: --a must be > 0, got 0.0; --b must be >= 0, got -1; --c must be within [0, 1], got 1.5"


class Payload:
    """A pickle that runs code when it is loaded: it creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.fixture
def two_steps(tmp_base_dir):
    """A tiny model and its optimisers, saved at steps 10 and 20 (steps 10's weights differ from step 20's)."""
    torch.manual_seed(0)
    config = config_from_depth(1, 64, 16, aspect_ratio=32, head_dim=16)
    model = GPT(config)
    model.init_weights()
    optimizers = model.setup_optimizers()
    d = common.checkpoint_dir("base", "tiny")
    for step in (10, 20):
        x = torch.randint(0, 64, (2, 16))
        model(x, x).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        common.save_checkpoint(d, step, model.state_dict(), {"optimizers": [o.state_dict() for o in optimizers]},
                               {"step": step, "model_config": asdict(config), "world_size": 1, "history": {}})
    return d, model, optimizers


def damage(path, kind, marker):
    data = open(path, "rb").read()
    content = {"payload": None, "truncated": data[:len(data) // 2], "emptied": b"", "garbage": os.urandom(len(data)),
               "not JSON": b"{oops", "[]": b"[]", "another step": b'{"step": 7}'}[kind]
    if content is None:
        torch.save({"weights": Payload(str(marker))}, path)
    else:
        open(path, "wb").write(content)


@pytest.mark.parametrize("name, kind", [
    ("model_000020.pt", "payload"), ("optim_000020_rank0.pt", "payload"), ("model_000020.pt", "truncated"),
    ("model_000020.pt", "emptied"), ("model_000020.pt", "garbage"), ("optim_000020_rank0.pt", "truncated"),
    ("meta_000020.json", "not JSON"), ("meta_000020.json", "[]"), ("meta_000020.json", "another step"),
])
def test_a_damaged_latest_step_falls_back_and_a_payload_never_runs(two_steps, tmp_path, capsys, name, kind):
    d, model, optimizers = two_steps
    marker = tmp_path / "payload_ran"
    damage(os.path.join(d, name), kind, marker)
    meta, _ = common.resume_checkpoint(d, model, optimizers, 0, "cpu", {})  # resume never continues from step 20
    assert meta["step"] == 10
    warning = capsys.readouterr().out.splitlines()[0]
    assert warning.startswith(f"warning: step 20 of {d} is damaged (") and warning.endswith("falling back to the "
                                                                                              "step before it")
    assert name in warning
    if kind == "payload":
        assert "was refused: it holds more than tensors and plain data (it asks for exec)" in warning
    loaded, _, _ = common.load_checkpoint(d, 10, load_rank_state=False)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())  # step 10's weights, restored
    # asked for by number, a damaged step is refused; with no intact step left, so is the latest
    with pytest.raises(SystemExit, match=f"^error: step 20 of {d} is damaged: {name}"):
        common.load_checkpoint(d, 20)
    damage(os.path.join(d, name.replace("20", "10")), kind, marker)
    with pytest.raises(SystemExit, match=f"^error: no intact checkpoint in {d}"):
        common.resume_checkpoint(d, model, optimizers, 0, "cpu", {})
    assert not marker.exists()


def test_a_model_whose_weights_do_not_fit_its_config_falls_back(two_steps, tmp_base_dir, capsys):
    from tokenizer import save_tokenizer
    d, _, _ = two_steps
    save_tokenizer({bytes([i]): i for i in range(256)})
    meta = json.load(open(os.path.join(d, "meta_000020.json")))
    meta["model_config"]["vocab_size"] = 65  # a changed vocabulary
    common.atomic_write_text(os.path.join(d, "meta_000020.json"), json.dumps(meta))
    model, _, meta = common.load_model("base", model_tag="tiny")
    assert meta["step"] == 10 and model.config.vocab_size == 64
    assert "its weights do not fit its model config (Error(s) in loading state_dict" in capsys.readouterr().out


def _resume_rank(rank, ckpt_dir, out):
    """One of two gloo ranks (conftest.gloo_ranks) resuming from ckpt_dir; writes the step it resumed at to
    out/rank<r>."""
    model = GPT(config_from_depth(1, 64, 16, aspect_ratio=32, head_dim=16))
    meta, _ = common.resume_checkpoint(ckpt_dir, model, model.setup_optimizers(), rank, "cpu", {})
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(str(meta["step"]))


def test_ranks_agree_on_the_step_when_only_one_ranks_file_is_damaged(two_steps, tmp_path):
    # a resume where rank 1's file of the latest step is damaged: rank 0 alone would take step 20 and rank 1 step
    # 10, and the run would go on with two different models (or hang in its first collective)
    d, _, _ = two_steps
    for step in (10, 20):
        meta = json.load(open(os.path.join(d, f"meta_{step:06d}.json")))
        common.atomic_write_text(os.path.join(d, f"meta_{step:06d}.json"), json.dumps({**meta, "world_size": 2}))
        shutil.copy(os.path.join(d, f"optim_{step:06d}_rank0.pt"), os.path.join(d, f"optim_{step:06d}_rank1.pt"))
    open(os.path.join(d, "optim_000020_rank1.pt"), "wb").write(b"truncated")
    gloo_ranks(tmp_path, _resume_rank, d, str(tmp_path))
    assert [open(tmp_path / f"rank{r}").read() for r in range(2)] == ["10", "10"]
