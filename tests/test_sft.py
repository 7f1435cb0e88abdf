"""sft.py: packing and masking, tricky batches (all-masked micro-batches, too-long conversations), and a tiny run."""
import json
import math
import re

import torch

from conftest import run_script
from sft import pack_rows, trainable_tokens

TINY = ["--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256", "--dtype=float32", "--eval_rows=8"]


def test_pack_rows_trains_only_masked_tokens_and_never_padding():
    examples = [([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6, 7], [0, 1, 1]), ([8, 9, 10, 11, 12, 13], [0, 0, 0, 1, 1, 1])]
    rows = pack_rows(examples, row_len=8, pad_id=0)
    # best-fit: the longest example that fits goes first; the other two share the next row
    packed = [r[0] for r in rows]
    assert packed == [[8, 9, 10, 11, 12, 13, 0], [1, 2, 3, 4, 5, 6, 7]]
    assert rows[0][1] == [-1, -1, 11, 12, 13, -1, -1]  # padding (the last two) never trained
    assert rows[1][1] == [-1, 3, 4, -1, 6, 7, -1]  # each conversation's first token is never a target
    assert trainable_tokens(rows) == 3 + 4


def test_an_all_masked_micro_batch_gives_zero_gradient_not_nan():
    from model import GPT, config_from_depth
    torch.manual_seed(0)
    model = GPT(config_from_depth(1, 64, 16, aspect_ratio=32, head_dim=16))
    model.init_weights()
    x = torch.randint(0, 64, (2, 16))
    y = torch.full((2, 16), -1)
    n_train = 5  # trainable tokens elsewhere in the step
    loss = model(x, y, loss_reduction="none").sum() / max(n_train, 1)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or (torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0) for p in model.parameters())


def test_sft_lowers_the_masked_loss_and_skips_conversations_too_long_to_train(world, tmp_path):
    run_script(["python", "pretrain.py", "--depth=1", "--aspect_ratio=32", "--head_dim=16", "--max_seq_len=64",
                "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=4", "--eval_every=0",
                "--dtype=float32"], world)
    long_user = {"messages": [{"role": "user", "content": "tell me a long story " * 80},
                              {"role": "assistant", "content": "No."}]}
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps(long_user) + "\n")
    out = run_script(["python", "sft.py"] + TINY + ["--num_iterations=16", "--eval_every=8", "--lr_scale=1.0",
                                                     f"--data={extra}"], world).stdout
    skipped = int(re.search(r"\((\d+) skipped", out).group(1))
    assert skipped >= 1
    val = [float(v) for v in re.findall(r"val loss ([\d.]+)", out)]
    losses = [float(v) for v in re.findall(r"\| loss ([\d.a-z]+)", out)]
    assert len(val) == 3 and val[-1] < val[0]
    assert all(math.isfinite(v) for v in losses)
    assert "saved checkpoint step 16" in out


def test_max_seq_len_shorter_than_every_conversation_is_a_clear_error(world):
    run_script(["python", "pretrain.py", "--depth=1", "--aspect_ratio=32", "--head_dim=16", "--max_seq_len=64",
                "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=1", "--eval_every=0",
                "--dtype=float32"], world)
    r = run_script(["python", "sft.py", "--max_seq_len=3", "--device_batch_size=2", "--total_batch_size=6",
                    "--dtype=float32"], world, check=False)
    assert r.returncode != 0 and "has a trainable token within max_seq_len=3" in r.stderr
    assert "Traceback" not in r.stderr
