"""The configurator, atomic writes and checkpoints of common.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

import common


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
    model_state, rank_state, meta = common.load_checkpoint(d)
    assert model_state["w"].tolist() == [30.0, 30.0] and rank_state == {"pos": 30} and meta == {"step": 30}
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
            model_state, rank_state, meta = common.load_checkpoint(d)
            assert model_state["w"].tolist() == [1.0, 1.0] and rank_state == {"pos": 1} and meta == {"step": 1}
    assert landed == ["model_000002.pt", "optim_000002_rank0.pt", "meta_000002.json"]  # the meta makes it a step
    assert common.last_step(d) == 2 and common.load_checkpoint(d)[0]["w"].tolist() == [2.0, 2.0]


def test_svg_chart_draws_each_series_and_skips_missing_points():
    svg = common.svg_chart({"train": [(1, 3.0), (2, 2.5), (3, None)], "val": [(2, 2.7)]}, "loss")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<polyline") == 2 and ">train<" in svg and ">val<" in svg
    assert "no data" in common.svg_chart({"x": [(1, None)]}, "empty")
