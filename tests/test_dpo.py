"""dpo.py: the DPO loss on hand-computed numbers, pairs from a file and from sampled groups, and short end-to-end
runs of `dpo.py` (from a pairs file and from sampled pairs) on test_rl.py's tiny random GPT and tokenizer."""
import json
import math

import pytest
import torch

import dpo
from tokenizer import load_tokenizer
from test_rl import answer_logprobs, rl_weights, run_rl, sft_model, tokenizer  # noqa: F401  (fixtures)


def test_dpo_loss_is_the_formula():
    # pair 1: beta * ((-1 - -2) - (-3 - -2)) = 0.5 * 2 = 1 -> -log sigmoid(1) = log(1 + e^-1) = 0.313262
    # pair 2: margin 0 -> log 2 = 0.693147
    pc, pr = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0])
    rc, rr = torch.tensor([-2.0, -5.0]), torch.tensor([-2.0, -4.0])
    loss, acc = dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx((0.313262 + 0.693147) / 2, abs=1e-5)
    assert acc.item() == 0.5


def test_pairs_from_groups_pair_first_right_with_first_wrong():
    groups = [[("a", False), ("b", True), ("c", True), ("d", False)], [("e", True), ("f", True)], [("g", False)]]
    assert dpo.pairs_from_groups([[1], [2], [3]], groups) == [([1], "b", "a")]


def test_pairs_from_json_render_like_sft(tokenizer):
    row = {"prompt": "Mia has 3 apples. How many now?", "chosen": "Mia has 3 + 2 = 5 apples.\n#### 5",
           "rejected": [{"type": "python", "text": "3+2"}, {"type": "python_output", "text": "5"},
                        {"type": "text", "text": "#### 6"}]}
    prompt, (chosen, chosen_mask), (rejected, rejected_mask) = dpo.pair_from_json(row, tokenizer)
    s = tokenizer.special
    assert prompt == tokenizer.render_for_completion([{"role": "user", "content": row["prompt"]}])
    assert chosen == tokenizer.encode(row["chosen"]) + [s("<|assistant_end|>")] and all(chosen_mask)
    out = [s("<|output_start|>")] + tokenizer.encode("5") + [s("<|output_end|>")]
    assert rejected == ([s("<|python_start|>")] + tokenizer.encode("3+2") + [s("<|python_end|>")] + out +
                        tokenizer.encode("#### 6") + [s("<|assistant_end|>")])
    assert [t for t, k in zip(rejected, rejected_mask) if not k] == out
    with pytest.raises(ValueError, match="prompt, chosen and rejected"):
        dpo.pair_from_json({"prompt": "hi", "chosen": "a"}, tokenizer)


def test_dpo_from_a_pairs_file_and_from_sampled_pairs(sft_model, monkeypatch, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} + {a}?", "chosen": f"{a} + {a} = {2 * a}.\n#### {2 * a}",
             "rejected": f"#### {2 * a + 1}"} for a in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_rl(monkeypatch, f"--pairs={path}", "--num_steps=2", "--eval_every=0", script="dpo.py")
    assert [s for s, _ in report["history"]["loss"]] == [1, 2]
    assert report["history"]["loss"][0][1] == pytest.approx(math.log(2), abs=1e-4)  # the policy is the reference
    # the policy now prefers each chosen answer over its rejected one more than the reference did
    pairs = [dpo.pair_from_json(row, load_tokenizer()) for row in rows]
    chosen = [(prompt, *answer) for prompt, answer, _ in pairs]
    rejected = [(prompt, *answer) for prompt, _, answer in pairs]
    margin = lambda state: answer_logprobs(state, chosen) - answer_logprobs(state, rejected)  # noqa: E731
    assert (margin(rl_weights(2)) > margin(sft_model)).all()
    report = run_rl(monkeypatch, "--dpo_problems=4", "--num_steps=1", "--eval_every=0", script="dpo.py")
    assert report["history"]["loss"][0][1] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("extra, message", [(["--pairs=missing.jsonl"], "not found"),
                                            (["--dataset=nope"], "unknown math dataset")])
def test_bad_settings_are_one_clear_error(sft_model, monkeypatch, extra, message):
    with pytest.raises(SystemExit, match=message):
        run_rl(monkeypatch, *extra, script="dpo.py")
