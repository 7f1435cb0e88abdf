"""Everywhere a user can put input, a mistake is one line that names the file, line or setting and the fix: data
files, tokenizer files, settings, config files, ports and devices. Each case runs the script as a user would (in
this process, for speed) and expects SystemExit with one line, never a traceback or a hang."""
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

import common
from conftest import run_main

PRETRAIN = ["pretrain.py", "--device=cpu", "--depth=1", "--aspect_ratio=32", "--head_dim=16", "--max_seq_len=64",
            "--device_batch_size=2", "--total_batch_size=256", "--dtype=float32", "--num_iterations=1",
            "--eval_every=1", "--eval_tokens=256", "--peak_flops=1e12"]
SFT = ["sft.py", "--device=cpu", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
       "--dtype=float32", "--num_iterations=1"]
ROLE_BOT = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}\n'
# a config file that would leave a mark if it ran
RUNS_CODE = b"depth = 2\nopen(__file__ + '.ran', 'w')\n"


def npy(array):
    import io
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# (the command line, files to write under $PICOCHAT_DIR, what the one line must say); {base} is $PICOCHAT_DIR
CASES = [
    pytest.param(PRETRAIN + ["--data={base}/d.jsonl"], {"d.jsonl": b'{"text": "a"}\n{oops\n'},
                 "d.jsonl, line 2: not JSON", id="pretrain data: a line that is not JSON"),
    pytest.param(PRETRAIN + ["--data={base}/d.jsonl"], {"d.jsonl": b'{"text": "a"}\n\n{"content": "b"}\n'},
                 'd.jsonl, line 3: expected an object with a "text" string', id="pretrain data: no text field"),
    pytest.param(PRETRAIN + ["--data={base}/d.txt"], {"d.txt": b"some text\n\x00\xff\xfe\x80\x81\n"},
                 "d.txt, line 2: not UTF-8 text", id="pretrain data: a binary file"),
    pytest.param(PRETRAIN + ["--data={base}/d.jsonl"], {"d.jsonl": b""},
                 "d.jsonl holds no text: training needs at least one non-empty document", id="pretrain data: empty"),
    pytest.param(PRETRAIN + ["--data={base}/d.txt"], {"d.txt": b"\n  \n\n"}, "d.txt holds no text",
                 id="pretrain data: a blank .txt"),
    pytest.param(PRETRAIN + ["--data={base}/d.jsonl"], {"d.jsonl": b'{"text": ""}\n{"text": " "}\n'},
                 "d.jsonl holds no text", id="pretrain data: only empty texts"),
    pytest.param(SFT + ["--data={base}/c.jsonl"], {"c.jsonl": b'{"text": "hi"}\n'},
                 "c.jsonl, line 1: a conversation needs a list of at least one message",
                 id="sft data: no messages"),
    pytest.param(SFT + ["--data={base}/c.jsonl"], {"c.jsonl": b'{"messages": [["user", "hi"]]}\n'},
                 "c.jsonl, line 1: message 0 must be an object with a role", id="sft data: messages of a wrong shape"),
    pytest.param(SFT + ["--data={base}/c.jsonl"], {"c.jsonl": b'\n{"messages": []}\n'},
                 "c.jsonl, line 2: a conversation needs a list of at least one message", id="sft data: empty messages"),
    pytest.param(SFT + ["--data={base}/c.jsonl"], {"c.jsonl": ROLE_BOT},
                 "c.jsonl, line 1: message 1 must be an object with a role (system, user or assistant)",
                 id="sft data: role bot"),
    pytest.param(PRETRAIN, {"tokenizer/tokenizer.json": b"[]"}, "tokenizer.json is not a picochat tokenizer.json",
                 id="tokenizer.json of []"),
    pytest.param(PRETRAIN, {"tokenizer/token_bytes.npy": npy(np.ones(7, dtype=np.int32))},
                 "token_bytes.npy holds (7,) int32, not the 400 integer byte lengths of the vocabulary",
                 id="token_bytes.npy of the wrong length"),
    pytest.param(PRETRAIN + ["--device_batch_size=0"], {}, "--device_batch_size must be at least 1, got 0",
                 id="--device_batch_size=0"),
    pytest.param(PRETRAIN + ["--device_batch_size=-8"], {}, "--device_batch_size must be at least 1, got -8",
                 id="--device_batch_size=-8"),
    pytest.param(PRETRAIN + ["--total_batch_size=0"], {}, "--total_batch_size must be at least 1, got 0",
                 id="--total_batch_size=0"),
    pytest.param(PRETRAIN + ["--depth=100000"], {}, "choose a smaller --depth", id="--depth=100000"),
    pytest.param(PRETRAIN + ["--matrix_lr=1e999"], {}, "--matrix_lr must be a finite number, got '1e999'",
                 id="--matrix_lr=1e999"),
    pytest.param(PRETRAIN + ["--embedding_lr=0", "--warmdown_ratio=2"], {},
                 "--embedding_lr must be > 0, got 0.0; --warmdown_ratio must be within [0, 1], got 2.0",
                 id="--embedding_lr=0"),
    pytest.param(SFT + ["--lr_scale=-1"], {}, "--lr_scale must be > 0, got -1.0", id="sft --lr_scale=-1"),
    pytest.param(PRETRAIN + ["--device=cuda"], {}, "--device=cuda but this torch finds no CUDA GPU",
                 id="--device=cuda without CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param(["chat.py", "--serve=1", "--port=99999"], {}, "--port must be from 0 to 65535 (0: any free port), got 99999",
                 id="chat.py --port=99999"),
    pytest.param(["pretrain.py", "{base}/c.py"], {"c.py": b"depth = 2\nmatrix_lr = = 1\n"},
                 "config file {base}/c.py, line 2: invalid syntax", id="a config file with a syntax error"),
    pytest.param(["pretrain.py", "{base}/c.py"], {"c.py": RUNS_CODE},
                 "c.py, line 2: only `key = value` lines are allowed (the file is read as data, never run)",
                 id="a config file that runs code"),
    pytest.param(["pretrain.py", "{base}/c.py"], {"c.py": b"depth = __import__('os').cpu_count()\n"},
                 "c.py, line 1: the value of depth must be a literal", id="a config value that is code"),
    pytest.param(["pretrain.py", "{base}/c.py"], {"c.py": b"matrix_lr = 1e999\n"},
                 "--matrix_lr must be a finite number, got '1e999'", id="a config value of inf"),
    pytest.param(["chat.py", "--device=cpu", "--source=base"], {"checkpoints/base/d1/model_000001.pt": b"\0" * 64},
                 "error: no intact checkpoint in {base}/checkpoints/base/d1", id="a damaged checkpoint, none intact"),
]


@pytest.fixture
def base_world(world):
    """The tiny world (data and a 400-token tokenizer) and a random tiny base checkpoint, d1 at step 1."""
    from model import GPT, config_from_depth
    from tokenizer import load_tokenizer
    tokenizer = load_tokenizer()
    config = config_from_depth(1, tokenizer.vocab_size, 64, aspect_ratio=32, head_dim=16)
    model = GPT(config)
    model.init_weights()
    common.save_checkpoint(common.checkpoint_dir("base", "d1"), 1, model.state_dict(), None,
                           {"step": 1, "model_config": asdict(config), "tokenizer_hash": tokenizer.hash})
    return world


@pytest.mark.parametrize("args, files, message", CASES)
def test_bad_input_is_one_line_naming_the_fix(base_world, one_thread, monkeypatch, args, files, message):
    for name, content in files.items():
        with open(os.path.join(base_world, name), "wb") as f:
            f.write(content)
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, *(arg.format(base=base_world) for arg in args))
    line = str(e.value)
    assert line.startswith("error: ") and "\n" not in line and message.format(base=base_world) in line, line
    assert not os.path.exists(os.path.join(base_world, "c.py.ran"))  # a config file is never run
