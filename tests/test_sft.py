"""sft.py: packing and masking (exactly the assistant's tokens are trained), tricky batches (all-masked micro-batches,
too-long conversations), and a tiny run whose reported validation loss is recomputed from its checkpoint."""
import json
import math
import re

import pytest
import torch

import common
from conftest import run_script
from data import load_conversations
from sft import pack_rows, render_all, trainable_tokens
from tokenizer import load_tokenizer, save_tokenizer

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


def test_sft_trains_exactly_the_assistant_tokens(tmp_base_dir):
    tok = load_tokenizer(save_tokenizer({bytes([i]): i for i in range(256)}))  # every byte one token
    s = tok.special
    conversations = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "python", "text": "2+2"},
                                           {"type": "python_output", "text": "4"}, {"type": "text", "text": "."}]},
         {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "ok"}],
    ]
    # what the assistant writes: its text, its calculator calls and each <|assistant_end|>; not the calculator's
    # output (forced in at generation time), nor anything of the user's or the system's
    written = (list(b"hello") + [s("<|assistant_end|>")] + list(b"It is ") + [s("<|python_start|>")] + list(b"2+2") +
               [s("<|python_end|>")] + list(b".") + [s("<|assistant_end|>")] + list(b"ok") + [s("<|assistant_end|>")])
    examples, skipped = render_all(tok, conversations, 64, train_everything=False)
    rows = pack_rows(examples, 64, tok.bos_id)
    trained = [t for _, targets in rows for t in targets if t >= 0]
    assert skipped == 0 and trainable_tokens(rows) == len(written) == 22
    assert sorted(trained) == sorted(written)
    # mid-training (--mid=1) trains on every token but the first of each row
    examples, _ = render_all(tok, conversations, 64, train_everything=True)
    rows = pack_rows(examples, 64, tok.bos_id)
    assert trainable_tokens(rows) == sum(len(ids) for ids, _ in examples) - len(rows)


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
    # the reported validation loss is the mean cross-entropy over the assistant's tokens of the val rows,
    # recomputed here from the saved model with an explicit log-softmax
    model, tok, meta = common.load_model("sft", model_tag="d1")
    examples, _ = render_all(tok, load_conversations("val"), 65, train_everything=False)
    rows = pack_rows(examples, 65, tok.bos_id)[:8]  # --eval_rows=8
    x, y = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])  # (8, 64)
    with torch.no_grad():
        logp = model(x).log_softmax(-1)  # (8, 64, V)
    scored = y >= 0
    nats = -logp.gather(-1, y.clamp(min=0)[..., None])[..., 0][scored]
    assert meta["metrics"]["val_loss"] == pytest.approx(nats.mean().item(), rel=1e-5)
    assert val[-1] == pytest.approx(nats.mean().item(), abs=1e-4)


def test_max_seq_len_shorter_than_every_conversation_is_a_clear_error(world):
    run_script(["python", "pretrain.py", "--depth=1", "--aspect_ratio=32", "--head_dim=16", "--max_seq_len=64",
                "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=1", "--eval_every=0",
                "--dtype=float32"], world)
    r = run_script(["python", "sft.py", "--max_seq_len=3", "--device_batch_size=2", "--total_batch_size=6",
                    "--dtype=float32"], world, check=False)
    assert r.returncode != 0 and "has a trainable token within max_seq_len=3" in r.stderr
    assert "Traceback" not in r.stderr
