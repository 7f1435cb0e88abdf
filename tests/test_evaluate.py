"""evaluate.py's tasks, report card and CLI: both multiple-choice scorers on a bigram stub whose answers are known,
bits per byte and the unigram baseline on a text whose values are known, pass@k and majority vote through the math
task with a scripted engine, the report card from hand-written sections, bad settings, and one end-to-end run on a
tiny pretrained checkpoint, its numbers recomputed independently. (The verifier: test_grade.py.)"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import common
import evaluate
from conftest import run_main
from data import load_mc, pretrain_files
from data.loader import TokenRows


@pytest.fixture
def tok(tmp_base_dir):
    """A real Tokenizer with no merges: every byte is one token, so test sequences are easy to write down."""
    from tokenizer import load_tokenizer, save_tokenizer
    return load_tokenizer(save_tokenizer({bytes([i]): i for i in range(256)}))


class Bigram(torch.nn.Module):
    """A stub model: the next token depends only on the current one, with the probabilities given as
    {(current, next): p}; the rest of each row's mass is spread evenly. Same call signature as model.GPT, and the
    log-probability table is its head's weight (the scorers put their batches where model.lm_head.weight is)."""

    def __init__(self, vocab_size, probs):
        super().__init__()
        table = torch.full((vocab_size, vocab_size), 1.0 / vocab_size)
        for a in {a for a, _ in probs}:
            given = {b: p for (a2, b), p in probs.items() if a2 == a}
            table[a] = (1 - sum(given.values())) / (vocab_size - len(given))
            for b, p in given.items():
                table[a, b] = p
        self.lm_head = torch.nn.Linear(vocab_size, vocab_size, bias=False)
        self.lm_head.weight = torch.nn.Parameter(table.log(), requires_grad=False)  # (V, V)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        logits = self.lm_head.weight[idx]  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss


NO_AUTOCAST = torch.autocast("cpu", enabled=False)

# -----------------------------------------------------------------------------
# Bits per byte


def test_bpb_and_unigram_baseline_on_a_known_text(tok, tmp_path, monkeypatch):
    # documents "ab": rows of 9 tokens are <|bos|> a b <|bos|> a b <|bos|> a b, so each row's 8 targets are 3 a, 3 b
    # (one byte each) and 2 <|bos|> (no text). A uniform model pays ln V nats per token: log2 V bits per byte, the
    # <|bos|> targets left out; the unigram baseline over a and b at 1/2 each: 1 bit per byte.
    path = tmp_path / "val.jsonl"
    path.write_text('{"text": "ab"}\n' * 12)
    monkeypatch.setattr(evaluate.data, "pretrain_files", lambda split, data_path="": [str(path)])
    uniform = Bigram(tok.vocab_size, {})
    uniform.config = type("config", (), {"sequence_len": 8, "vocab_size": tok.vocab_size})
    result = evaluate.eval_bpb(uniform, tok, "cpu", NO_AUTOCAST, max_tokens=1000, rows_per_batch=2)
    assert result == {"bpb": pytest.approx(math.log2(tok.vocab_size)), "unigram_bpb": pytest.approx(1.0),
                      "tokens": 4 * 6}  # 12 documents make 4 rows

# -----------------------------------------------------------------------------
# Multiple choice


def test_loglik_scorer_takes_the_lowest_mean_loss(tok):
    sp, x, y, z, b = (ord(c) for c in " xyzb")
    # item 1: after a space, "b" is likelier than "a" or "c". item 2: " z" costs 5.58 (the space) + 2 = 7.58 in sum, 3.79 on
    # average; " xy" costs 5.58 + 0.22 + 4 = 9.80 in sum but 3.27 on average: the mean picks "xy"
    model = Bigram(tok.vocab_size, {(sp, b): 0.05, (sp, z): math.exp(-2), (sp, x): 0.8, (x, y): math.exp(-4)})
    items = [{"question": "Q", "choices": ["a", "b", "c"], "answer": 1},
             {"question": "Q", "choices": ["z", "xy"], "answer": 1}]
    for rows_per_batch in (1, 2, 16):  # rows of one item split across batches or not: the same choices
        assert evaluate.mc_loglik_choices(model, tok, items, NO_AUTOCAST, rows_per_batch) == [1, 1]
    # cropped from the left, the continuation is still what is scored
    assert evaluate.mc_loglik_choices(model, tok, items, NO_AUTOCAST, 4, max_len=3) == [1, 1]
    assert evaluate.mc_metrics(items, [1, 0]) == {"acc": 0.5, "centered": pytest.approx((0.5 - 5 / 12) / (7 / 12)),
                                                  "n": 2}


def test_loglik_scorer_reads_a_chat_models_choice_as_its_reply(tok):
    # the reply starts right after <|assistant_start|>: "b" is likely there, and nowhere else. Read as a
    # continuation of the bare question, every choice costs the same and the tie goes to the first
    model = Bigram(tok.vocab_size, {(tok.special("<|assistant_start|>"), ord("b")): 0.9})
    items = [{"question": "Which one?", "choices": ["a", "b", "c"], "answer": 1}]
    assert evaluate.mc_loglik_choices(model, tok, items, NO_AUTOCAST, 16, chat=True) == [1]
    assert evaluate.mc_loglik_choices(model, tok, items, NO_AUTOCAST, 16) == [0]


def test_letter_scorer_picks_the_likeliest_letter_among_the_items_own(tok):
    start = tok.special("<|assistant_start|>")
    A, C, E = ord("A"), ord("C"), ord("E")
    model = Bigram(tok.vocab_size, {(start, E): 0.6, (start, C): 0.25, (start, A): 0.1})
    items = [{"question": "Which?", "choices": ["w", "x", "y", "z"], "answer": 2},  # A-D: C wins (E is no choice)
             {"question": "And now, a longer question?", "choices": ["yes", "no"], "answer": 1}]  # A-B: A
    assert evaluate.mc_letter_choices(model, tok, items, NO_AUTOCAST, 16) == [2, 0]
    assert evaluate.mc_letter_choices(model, tok, items, NO_AUTOCAST, 1, max_len=5) == [2, 0]
    assert evaluate.mc_metrics(items, [2, 0]) == {"acc": 0.5, "centered": pytest.approx((0.5 - 3 / 8) / (5 / 8)),
                                                  "n": 2}

# -----------------------------------------------------------------------------
# Math: a scripted engine answers each prompt with given texts


class ScriptedEngine:
    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []  # answers: {prompt text: [texts]}

    def generate_batch(self, prompts, num_samples=1, max_new_tokens=256, temperature=1.0, top_k=0, top_p=1.0,
                       seed=None):
        self.calls.append({"n": len(prompts), "num_samples": num_samples, "temperature": temperature, "seed": seed})
        end = self.tokenizer.special("<|assistant_end|>")
        out = []
        for prompt in prompts:
            texts = self.answers[self.tokenizer.decode(prompt)]
            assert len(texts) == num_samples
            out.append([(self.tokenizer.encode(t) + [end], [1] * (len(t) + 1)) for t in texts])
        return out


def math_run(tok, samples, **kwargs):
    """samples: [(reference, [answer texts])]; one problem each, its question is its index."""
    problems = [{"question": str(i), "answer": ref} for i, (ref, _) in enumerate(samples)]
    prompts = [tok.render_for_completion([{"role": "user", "content": p["question"]}]) for p in problems]
    engine = ScriptedEngine(tok, {tok.decode(p): texts for p, (_, texts) in zip(prompts, samples)})
    return evaluate.eval_math(engine, problems, prompts, num_samples=len(samples[0][1]), **kwargs), engine.calls


def test_math_pass_at_k_averages_over_problems(tok):
    samples = [("2 + 2 = 4\n#### 4", ["So 4.\n#### 4", "#### 5", "2 + 2 = 4\n#### 4", "I don't know"]),  # 2 of 4
               ("#### 7", ["#### 1", "#### 2", "#### 3", "#### 70"]),  # none
               ("#### 3/4", ["#### 0.75", "#### 3/4", "#### 6/8", "the answer is 0.75"])]  # all (prose: last number)
    metrics, calls = math_run(tok, samples, batch_size=2, temperature=1.0, seed=5)
    # pass@1 = c/n per problem: (0.5 + 0 + 1) / 3; pass@4 = 1 - C(n-c, 4)/C(n, 4): (1 + 0 + 1) / 3
    assert metrics == {"pass@1": pytest.approx(0.5), "pass@4": pytest.approx(2 / 3), "n": 3}
    # two batches (2 problems, then 1), 4 samples each, a different seed per batch
    assert [(c["n"], c["num_samples"], c["temperature"]) for c in calls] == [(2, 4, 1.0), (1, 4, 1.0)]
    assert calls[0]["seed"] != calls[1]["seed"]


def test_math_majority_vote_groups_equal_answers(tok):
    samples = [("#### 0.5", ["#### 0.5", "#### 1/2", "#### 3"]),  # 0.5 and 1/2 vote together: right
               ("#### 3", ["#### 2", "#### 3", "#### 4"]),  # a three-way tie goes to the first seen: wrong
               ("#### 9", ["#### 9", "no idea", "#### 8"])]  # an answer-less sample does not vote
    metrics, _ = math_run(tok, samples, vote=True, temperature=1.0)
    assert metrics["maj@3"] == pytest.approx(2 / 3)
    assert metrics["pass@1"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3) / 3)
    assert metrics["pass@3"] == pytest.approx(1.0)


def test_greedy_math_reports_pass1_only(tok):
    metrics, calls = math_run(tok, [("#### 4", ["#### 4"]), ("#### 5", ["#### 6"])])
    assert metrics == {"pass@1": 0.5, "n": 2} and calls[0]["temperature"] == 0.0


def test_math_slices_and_chat_retention(tok):
    problems = [{"question": str(i), "answer": f"#### {i}", "slice": sl} for i, sl in enumerate("aabb")]
    prompts = [tok.render_for_completion([{"role": "user", "content": p["question"]}]) for p in problems]
    replies = ["#### 0", "#### 9", "#### 2", "#### 3"]  # slice a: 1 of 2, slice b: 2 of 2
    engine = ScriptedEngine(tok, {tok.decode(p): [r] for p, r in zip(prompts, replies)})
    assert evaluate.eval_math(engine, problems, prompts, batch_size=3)["slices"] == {
        "a": {"pass@1": 0.5, "n": 2}, "b": {"pass@1": 1.0, "n": 2}}
    probes = [{"prompt": "hi", "kind": "smalltalk", "expect": None},
              {"prompt": "hello", "kind": "smalltalk", "expect": None},
              {"prompt": "Who are you?", "kind": "identity", "expect": ["picochat"]},
              {"prompt": "Where does Mia live?", "kind": "fact", "expect": ["Oakvale"]},
              {"prompt": "What does Tom do?", "kind": "fact", "expect": ["baker"]}]
    replies = ["Hello! How can I help?", "<<2+2=4>>4\n#### 4", "I am picochat.", "Mia lives in oakvale.",
               "Tom is a farmer."]  # a math answer to small talk, and a wrong fact, are not handled
    prompts = [tok.render_for_completion([{"role": "user", "content": p["prompt"]}]) for p in probes]
    engine = ScriptedEngine(tok, {tok.decode(p): [r] for p, r in zip(prompts, replies)})
    assert evaluate.eval_chat(engine, probes, batch_size=2) == {
        "handled": 0.6, "smalltalk": 0.5, "identity": 1.0, "fact": 0.5, "n": 5}


def test_base_model_prompt_and_answer_cut(tok):
    shots = [{"question": f"q{i}", "answer": f"a\n#### {i}"} for i in range(3)]
    ids, k = evaluate.fewshot_prompt(tok, "What?", shots, limit=1000)
    assert k == 3 and tok.decode(ids) == (
        "<|bos|>Question: q0\nAnswer: a\n#### 0<|bos|>Question: q1\nAnswer: a\n#### 1"
        "<|bos|>Question: q2\nAnswer: a\n#### 2<|bos|>Question: What?\nAnswer:")
    short, k = evaluate.fewshot_prompt(tok, "What?", shots, limit=60)  # only as many shots as fit
    assert len(short) <= 60 and tok.decode(short).count("Question:") == 2 and k == 1
    ids, k = evaluate.fewshot_prompt(tok, "What?", shots, limit=1)
    assert tok.decode(ids) == "<|bos|>Question: What?\nAnswer:" and k == 0
    # a base model goes on writing the next document: only its first answer counts
    text = " 3 + 4 = 7\n#### 7\nQuestion: and 2 + 2?\nAnswer: 4\n#### 4"
    assert evaluate.completion_text(tok.encode(text) + [tok.bos_id], tok, chat=False) == " 3 + 4 = 7\n#### 7"
    assert evaluate.completion_text(tok.encode(" 7\nQuestion: x"), tok, chat=False) == " 7"
    end = tok.special("<|assistant_end|>")
    assert evaluate.completion_text(tok.encode("#### 7") + [end], tok) == "#### 7"

# -----------------------------------------------------------------------------
# The report card


def write_sections(base):
    report = os.path.join(base, "report")
    os.makedirs(report)
    sections = {
        "tokenizer": {"config": {"vocab_size": 4096}, "vocab_size": 4096, "train_seconds": 12.0},
        "tokenizer_eval": {"bytes_per_token": 3.9},
        "base": {"config": {"depth": 4}, "metrics": {"val_bpb": 1.25, "loss": 3.1},
                 "history": {"loss": [[1, 6.0], [2, 5.0], [3, 4.0]], "val_bpb": [[0, 3.0], [3, 1.25]]}},
        "sft": {"config": {"num_epochs": 1}, "metrics": {"val_loss": 1.5},
                "history": {"loss": [[1, 2.0], [2, 1.6]], "val_loss": [[2, 1.5]]}},
        "rl": {"config": {"num_steps": 2}, "metrics": {"pass1": 0.4},
               "history": {"reward": [[1, 0.2], [2, 0.3]], "pass1": [[0, 0.25], [2, 0.4]]}},
        "eval_base": {"checkpoint": {"stage": "base", "model_tag": "d4", "step": 600},
                      "metrics": {"bpb": 1.2, "unigram_bpb": 3.4, "mc/tinyworld/acc": 0.3}},
        "eval_sft": {"checkpoint": {"stage": "sft", "model_tag": "d4", "step": 200},
                     "results": {"math/tinyworld": {"pass@1": 0.25, "settings": {"max_new_tokens": 256}}},
                     "metrics": {"mc/tinyworld/acc": 0.5, "math/tinyworld/pass@1": 0.25}},
        "eval_rl": {"checkpoint": {"stage": "rl", "model_tag": "d4", "step": 40},
                    "metrics": {"math/tinyworld/pass@1": 0.5}},
    }
    for name, section in sections.items():
        with open(os.path.join(report, f"{name}.json"), "w") as f:
            json.dump(section, f)
    for name, s in {"tokenizer": 30, "base": 600, "sft": 120, "rl": 300, "eval": 90, "data": 60}.items():
        with open(os.path.join(report, f"{name}.seconds"), "w") as f:
            f.write(f"{s}\n")
    return report


def test_report_card(tmp_base_dir, capsys):
    report = write_sections(tmp_base_dir)
    summary = evaluate.write_report()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == summary == {
        "total_min": 20.0, "tokenizer_min": 0.5, "pretrain_min": 10.0, "sft_min": 2.0, "rl_min": 5.0,
        "eval_min": 1.5, "bpb": 1.2, "pass1_sft": 0.25, "pass1_rl": 0.5, "bpb_sft": None, "bpb_rl": None,
        "chat_sft": None, "chat_rl": None}
    with open(os.path.join(report, "report.md")) as f:
        md = f.read()
    assert "| metric | base | sft | rl |" in md
    assert "| bpb | 1.2000 | - | - |" in md
    assert "| mc/tinyworld/acc | 0.3000 | 0.5000 | - |" in md
    assert "| math/tinyworld/pass@1 | - | 0.2500 | 0.5000 |" in md
    assert "| pretrain | " not in md and "| base | 10.0 |" in md and "| total | 20.0 |" in md
    assert md.count("<svg") == 4  # training loss, val bpb, sft loss, rl reward and pass@1
    assert "RL: reward and held-out pass@1" in md and "Python " in md and "CPU: " in md
    assert "vocabulary: 4,096 tokens" in md and "3.900 bytes per token" in md
    assert "- math/tinyworld: max_new_tokens=256" in md


def test_report_card_with_nothing_and_with_a_broken_section(tmp_base_dir, capsys):
    assert evaluate.write_report() == dict.fromkeys(
        ["total_min", "tokenizer_min", "pretrain_min", "sft_min", "rl_min", "eval_min", "bpb", "pass1_sft",
         "pass1_rl", "bpb_sft", "bpb_rl", "chat_sft", "chat_rl"])
    assert "## Metrics" not in open(os.path.join(tmp_base_dir, "report", "report.md")).read()
    with open(os.path.join(tmp_base_dir, "report", "sft.json"), "w") as f:
        f.write('{"config": ')
    with pytest.raises(SystemExit, match="sft.json"):
        evaluate.write_report()

# -----------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("args, message", [
    (["--task=bpb,speed"], "--task must name some of bpb, mc, math, chat"),
    (["--source=chat"], "--source must be base, sft, rl, all, hf:"),
    (["--vote=1"], "--vote=1 takes the majority of several answers"),
    (["--max_new_tokens=0", "--batch_size=0"], "--max_new_tokens must be >= 1, got 0; --batch_size must be"),
    (["--task=mc", "--dataset=gsm8k"], "--dataset=gsm8k is a math set, but --task has no math"),
    (["--dataset=squad"], "unknown --dataset 'squad'"),
    (["--source=all"], "no base, sft or rl checkpoint"),
    (["--source=rl"], "no rl checkpoint"),
])
def test_bad_settings_are_one_clear_error(one_thread, monkeypatch, args, message):
    with pytest.raises(SystemExit) as e:
        run_main(monkeypatch, "evaluate.py", *args)
    assert message in str(e.value)


def test_cli_end_to_end_on_a_tiny_base_model(world, one_thread, monkeypatch, capsys):
    run_main(monkeypatch, "pretrain.py", "--depth=1", "--aspect_ratio=32", "--head_dim=16", "--max_seq_len=64",
             "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=2", "--eval_every=0",
             "--dtype=float32")
    capsys.readouterr()
    run_main(monkeypatch, "evaluate.py", "--source=base", "--task=bpb,mc,math", "--max_problems=4",
             "--max_new_tokens=16", "--eval_tokens=8192")
    out = capsys.readouterr().out
    table = out[out.index("| metric | base |"):].strip().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == [
        "bpb", "unigram_bpb", "mc/tinyworld/acc", "mc/tinyworld/centered", "math/tinyworld/pass@1",
        *[f"math/tinyworld/{name}/pass@1"
          for name in ("id", "phrasing", "composition", "length", "meaning", "arith")]]
    with open(os.path.join(world, "report", "eval_base.json")) as f:
        section = json.load(f)
    assert section["checkpoint"] == {"stage": "base", "model_tag": "d1", "step": 2}
    assert section["config"]["max_problems"] == 4 and section["results"]["mc/tinyworld"]["n"] == 4
    assert section["results"]["math/tinyworld"]["n"] == 24  # 4 of each slice
    m = section["metrics"]
    # two steps of training: the model is still worse than the unigram baseline, but far better than uniform
    assert 0 < m["unigram_bpb"] < m["bpb"] < 12
    assert f"| bpb | {m['bpb']:.4f} |" in out and 0 < section["results"]["bpb"]["tokens"] <= 8192
    # the numbers recomputed from the checkpoint by the definitions, one row at a time
    model, tok, _ = common.load_model("base")

    def nats(ids):  # per-token loss of ids[1:], (T,)
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)  # (T, V)
        return -logp[torch.arange(len(ids) - 1), ids[1:]]

    items = load_mc("tinyworld", "test")[:4]
    chosen = []
    for item in items:  # a base model's choice: the continuation with the lowest mean loss per token
        context = tok.encode(item["question"], prepend=tok.bos_id)
        continued = [tok.encode(item["question"] + " " + c, prepend=tok.bos_id) for c in item["choices"]]
        losses = [nats(ids)[len(os.path.commonprefix([context, ids])) - 1:].mean() for ids in continued]
        chosen.append(min(range(len(losses)), key=losses.__getitem__))
    assert m["mc/tinyworld/acc"] == sum(c == item["answer"] for c, item in zip(chosen, items)) / 4
    rows = TokenRows(tok, pretrain_files("val"), 16, 64, [0], 1, loop=False)
    total_nats = total_bytes = 0.0
    for _ in range(8192 // (16 * 64)):  # the same rows: 8 batches of 16 rows of 64 targets
        x, y = rows.next_batch(0, "cpu")
        for inputs, targets in zip(x.tolist(), y.tolist()):
            nbytes = torch.tensor(tok.token_bytes[targets])  # (64,), 0 for special tokens: they stand for no text
            total_nats += nats(inputs + targets[-1:])[nbytes > 0].sum().item()
            total_bytes += nbytes.sum().item()
    assert m["bpb"] == pytest.approx(total_nats / total_bytes / math.log(2), rel=1e-5)
