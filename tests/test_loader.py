"""data/loader.py: the pretraining token stream resumes exactly where its state was saved, and bits per byte on a
stub model whose per-token losses are known."""
import io
import json
import math

import pytest
import torch

from data.loader import TokenRows, evaluate_bpb
from tokenizer import load_tokenizer, save_tokenizer


@pytest.fixture
def byte_tok(tmp_base_dir):
    """A real Tokenizer with no merges: every byte is one token."""
    return load_tokenizer(save_tokenizer({bytes([i]): i for i in range(256)}))


def test_a_saved_state_resumes_the_stream_exactly(byte_tok, tmp_path):
    # distinct documents of different lengths, and a buffer of 2 documents per slot: the stream reads ahead only a
    # few documents, so what comes after a resume depends on the saved file position, not only on the buffers
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"d{i}" + "xyz"[i % 3] * (i % 5)}) + "\n" for i in range(80)))

    def stream():
        return TokenRows(byte_tok, [str(path)], batch_size=2, seq_len=6, slots=[0, 1], num_slots=2, buffer_docs=2)

    def batches(rows, n):
        return [rows.next_batch(slot, "cpu") for _ in range(n) for slot in (0, 1)]

    rows = stream()
    batches(rows, 3)
    saved = io.BytesIO()
    torch.save(rows.state(), saved)  # as a checkpoint keeps it
    expected = batches(rows, 8)
    resumed = stream()
    saved.seek(0)
    resumed.load_state([torch.load(saved, weights_only=False)])  # every saved rank's state, in rank order
    for (x, y), (rx, ry) in zip(expected, batches(resumed, 8), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert byte_tok.decode(expected[-1][0][0].tolist()).startswith("<|bos|>d")  # rows open at a document start


class KnownLosses(torch.nn.Module):
    """A stub model: predicting target token t costs 0.1 * (t + 1) nats, whatever the context."""

    def forward(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return torch.where(y >= 0, 0.1 * (y + 1).float(), 0.0)  # (B, T)


def test_bits_per_byte_leave_special_tokens_out():
    token_bytes = torch.tensor([0, 1, 2, 3])  # token 0 is a special token: it stands for no text
    targets = [torch.tensor([[0, 1, 2], [3, 0, 2]]), torch.tensor([[1, 1, 0]])]
    batches = [(torch.zeros_like(y), y) for y in targets]
    bpb = evaluate_bpb(KnownLosses(), batches, token_bytes, torch.autocast("cpu", enabled=False))
    # the text tokens: 1, 2, 3, 2, 1, 1 -> 0.2 + 0.3 + 0.4 + 0.3 + 0.2 + 0.2 = 1.6 nats over 1+2+3+2+1+1 = 10 bytes
    assert bpb == pytest.approx(1.6 / (10 * math.log(2)))
