"""sft.py's distillation (rejection sampling): what is kept of a teacher's answers (right, finished, distinct, at
most m per problem), replies turned back into messages, and an end-to-end run in which a scripted teacher's right
answers train a tiny student whose loss falls. Uses test_rl.py's tiny random GPT, tokenizer and runner."""
import json
import os

import pytest

import data.grade
import sft
from data.grade import Sample
from tokenizer import load_tokenizer
from test_rl import run_here, scripted_generate, sft_model, tokenizer  # noqa: F401  (sft_model, tokenizer: fixtures)


def reply(tokenizer, text, end=True):
    return tokenizer.encode(text) + ([tokenizer.special("<|assistant_end|>")] if end else [])


def test_rejection_sampling_keeps_right_finished_distinct_answers_at_most_m(tokenizer):
    def sample(text, correct, end=True):
        tokens = reply(tokenizer, text, end)
        return Sample(tokens, [1] * len(tokens), float(correct), correct)
    group = [sample("Mia has 6.\n#### 6", False),  # wrong
             sample("Mia has 5.\n#### 5", True, end=False),  # right, but cut off before it ended its turn
             sample("Mia has 3 + 2 = 5 apples.\n#### 5", True),
             sample("Mia has 3 + 2 = 5 apples.\n#### 5", True),  # the same text again
             sample("#### 5", True),
             sample("Mia has 5 apples.\n#### 5", True)]  # a third distinct right answer: over m = 2
    assert sft.verified_answers(group, tokenizer, keep=2) == ["Mia has 3 + 2 = 5 apples.\n#### 5", "#### 5"]
    assert sft.verified_answers(group, tokenizer, keep=5) == ["Mia has 3 + 2 = 5 apples.\n#### 5", "#### 5",
                                                              "Mia has 5 apples.\n#### 5"]
    assert sft.verified_answers(group[:2], tokenizer, keep=2) == []


def test_a_reply_with_a_calculator_call_becomes_parts_that_render_back_to_its_tokens(tokenizer):
    s = tokenizer.special
    tokens = (tokenizer.encode("Let me use the calculator.") + [s("<|python_start|>")] + tokenizer.encode("3+2") +
              [s("<|python_end|>"), s("<|output_start|>")] + tokenizer.encode("5") + [s("<|output_end|>")] +
              tokenizer.encode("\n#### 5"))
    content = sft.reply_content(tokens, tokenizer)
    assert content == [{"type": "text", "text": "Let me use the calculator."}, {"type": "python", "text": "3+2"},
                       {"type": "python_output", "text": "5"}, {"type": "text", "text": "\n#### 5"}]
    messages = [{"role": "user", "content": "Mia has 3 apples. How many now?"}]
    prompt = tokenizer.render_for_completion(messages)
    ids, mask = tokenizer.render_conversation(messages + [{"role": "assistant", "content": content}])
    assert ids == prompt + tokens + [s("<|assistant_end|>")]
    assert sft.reply_content(tokenizer.encode("#### 5"), tokenizer) == "#### 5"
    # special tokens outside a well-formed call: not learned from
    assert sft.reply_content(tokens[:tokens.index(s("<|output_end|>"))], tokenizer) is None  # an unclosed output
    assert sft.reply_content(tokenizer.encode("a") + [s("<|python_end|>")], tokenizer) is None
    assert sft.reply_content([s("<|python_start|>"), s("<|output_start|>"), s("<|python_end|>")], tokenizer) is None


def test_a_student_distilled_from_a_teachers_right_answers_learns_them(sft_model, monkeypatch, tmp_base_dir):
    import model
    tok = load_tokenizer()
    right, wrong = reply(tok, "Add them: 3 + 2 = 5.\n#### 5"), reply(tok, "It is 6.\n#### 6")
    # the teacher (the tiny sft model, whose sampling is scripted here) writes the right answer in every row; the
    # grader believes only "#### 5"
    monkeypatch.setattr(model, "generate", scripted_generate(right))
    monkeypatch.setattr(data.grade, "grade", lambda text, reference: text.endswith("#### 5"))
    report = run_here(monkeypatch, "sft.py", [
        "--source=sft", "--model_tag=tiny", "--out_tag=student", "--distill_from=sft", "--distill_problems=6",
        "--distill_samples=3", "--distill_keep=2", "--mixture=0", "--max_seq_len=128", "--device_batch_size=4",
        "--total_batch_size=512", "--num_iterations=12", "--lr_scale=1.0", "--eval_every=0", "--dtype=float32"],
        "sft")
    path = os.path.join(tmp_base_dir, "data", "distill", "sft_tiny_1.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 6  # 3 identical right answers per problem: one kept
    assert all(r["messages"][1] == {"role": "assistant", "content": "Add them: 3 + 2 = 5.\n#### 5"} for r in rows)
    losses = [loss for _, loss in report["history"]["loss"]]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.5 * sum(losses[:3])
    assert report["checkpoint"].endswith(os.path.join("sft", "student"))
    # a teacher that never answers right leaves nothing to learn from
    monkeypatch.setattr(model, "generate", scripted_generate(wrong))
    with pytest.raises(SystemExit, match="no conversations to train on"):
        run_here(monkeypatch, "sft.py", ["--source=sft", "--model_tag=tiny", "--out_tag=student2",
                                         "--distill_from=sft", "--distill_problems=2", "--mixture=0"], "sft")


def test_an_sft_source_must_not_save_over_itself(sft_model, monkeypatch):
    with pytest.raises(SystemExit, match="would save over the model it starts from"):
        run_here(monkeypatch, "sft.py", ["--source=sft", "--model_tag=tiny"], "sft")
