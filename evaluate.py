"""
Evaluate picochat models (bits per byte, multiple choice, math) and assemble the report card.

    python evaluate.py                                   # the sft model: bits per byte, multiple choice, math
    python evaluate.py --source=all                      # base, sft and rl: each stage that has a checkpoint
    python evaluate.py --source=base --task=bpb,mc       # tasks: bpb, mc, math, chat (comma-separated)
    python evaluate.py --task=mc --dataset=arc_easy      # a downloaded set (python data/arc.py first)
    python evaluate.py --task=math --dataset=gsm8k --max_problems=200
    python evaluate.py --task=math --num_samples=8       # pass@1 and pass@8, sampled (temperature 1 unless given)
    python evaluate.py --task=math --num_samples=8 --vote=1   # and maj@8: the samples' majority answer, graded
    python evaluate.py --quantize=int8                   # the model with its weights quantized (int8, int4)
    python evaluate.py --report=1                        # $PICOCHAT_DIR/report/report.md from the stages' sections
    python evaluate.py --source=hf:Qwen/Qwen3-0.6B-Base --task=math --dataset=math500 --prompt_style=boxed \
        --max_new_tokens=2048                           # an open model (python data/hf_model.py first; README.md)

The tasks (each function below says how it scores):
- bpb: bits per byte on held-out pretraining text (pretrain.py's measure), next to a unigram baseline.
- mc: accuracy and the centred score (acc - chance) / (1 - chance) on the built-in items and every downloaded set
  (arc_easy, arc_challenge, mmlu, hellaswag), or the sets --dataset names. Every model is scored by the choice it
  finds likeliest as the continuation (nanochat's CORE; for a chat model, as its reply to the question), and a
  chat model also by the letter it finds likeliest as its reply's first token when shown lettered choices
  (nanochat's chat eval; acc_letter): a tiny model knows answers long before it can name them by letter.
- math: word problems (built in; gsm8k, math500 with --dataset) answered with model.py's Engine (calculator
  included) and graded by data/grade.py. Greedy by default; --num_samples=K gives pass@1 and pass@K (sampled at
  temperature 1 unless given), --vote=1 also maj@K. A base model gets a few-shot prompt in the pretraining
  format, a chat model a user turn, and --prompt_style=boxed asks in plain text for a final \boxed{} answer (as
  reasoning-from-scratch evaluates Qwen3-0.6B-Base). tinyworld's test problems come in slices
  (data/tinyworld.py), each reported on its own: id (training's patterns and shapes, new numbers), phrasing (a
  sentence pattern training never has), composition (a computation shape training never has), length (more steps
  than any training problem), meaning (an event meaning no training problem tells, only pretraining stories) and
  arith (bare arithmetic asked in held-out words); --max_problems then counts per slice.
- chat (chat prompting only): chat retention, the share of tinyworld's held-out non-math prompts (identity, small
  talk, world facts, in phrasings no training file has) a model still handles: greedy replies graded by
  data.chat_reply_ok (no "####", no calculator call, the right fact named). Math training that turns every reply
  into a solution shows here.
Each run (one process, not under torchrun) prints a markdown table and writes report/eval_<source>.json (with
--quantize=int8: eval_<source>_int8.json, which the report card leaves out): the checkpoint (stage, tag, step), the
settings and every metric; earlier results on the same checkpoint stay unless measured again. The report card
(--report=1) reads report/*.json and speedrun.sh's <stage>.seconds, leaves out whatever is missing, and prints as its
last line one JSON object: {"total_min", "tokenizer_min", "pretrain_min", "sft_min", "rl_min", "eval_min", "bpb",
"pass1_sft", "pass1_rl", "bpb_sft", "bpb_rl", "chat_sft", "chat_rl"}. The answer checker is data/grade.py (`from
evaluate import grade` works too).
"""

import contextlib
import glob
import json
import math
import os
import re
import time

import torch

import common
import data
from data import LETTERS, MATH_SPLITS, MC_SPLITS, data_dir, mc_conversation
from data.grade import extract_answer, grade, majority_vote, pass_at_k, response_text  # noqa: F401  (users)
from data.loader import TokenRows, evaluate_bpb
from model import QUANT_FORMATS, Engine, quantize_model

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
source = "sft"              # base|sft|rl, or all: each of them that has a checkpoint; or an open model:
                            # hf:<org>/<name> (python data/hf_model.py) or the path of a Hugging Face model folder
prompt_style = ""           # how questions are put: chat (user turns; MC: the letter the reply starts with) | base
                            # (math: few-shot documents; MC: likeliest continuation) | boxed (math: a plain-text
                            # instruction to end with \boxed{answer}; MC as base) | "": chat for sft and rl, else base
task = "bpb,mc,math,chat"   # comma-separated: bpb, mc, math, chat
dataset = ""                # comma-separated sets (each to the task it belongs to); "": the tasks' defaults
model_tag = ""              # "": the stage's most recently saved model
step = -1                   # -1: its latest step
max_problems = 0            # mc items / math problems / chat prompts per set (per slice), the first ones (0: all)
eval_tokens = 65536         # bpb: tokens of held-out text (pretrain.py's default, so the numbers compare; 0: all)
num_samples = 1             # math: answers per problem
vote = False                # math: also grade the majority answer of the num_samples answers (maj@k)
temperature = 0.0           # math: 0 is greedy
top_k = 0                   # math: sample from the k likeliest tokens (0: all)
max_new_tokens = 256        # math: longest answer
batch_size = 16             # problems per generation batch; rows per forward for bpb and mc
dtype = "float32"           # the weights: float32|bfloat16 (no autocast; "": bfloat16 on CUDA and AMX CPUs)
quantize = ""               # int8|int4: the weights stored quantized at load time (what it costs in quality)
device = ""                 # cuda|mps|cpu; "": the best available
compile_generate = False    # decode through a torch.compile'd step (model.generate's compile): compiling takes
                            # tens of seconds on a CPU, paid back by long generations (tests/bench_generate.py)
report = False              # assemble the report card instead of evaluating
seed = 0

# -----------------------------------------------------------------------------
# Task: bits per byte

LOGITS_PER_BATCH = 2**28  # 1 GiB of fp32 logits; Qwen3's rows of 4,096 tokens x 151,936 take 2.3 GiB each


def eval_bpb(model, tokenizer, device, autocast_ctx, max_tokens=65536, rows_per_batch=16):
    """Bits per byte on the held-out pretraining text (pretrain.py's measure, on the same stream of rows), and the
    unigram baseline on the same tokens. The baseline is fitted to the very tokens it is scored on, so it is a
    slightly optimistic bar; how far below it a model gets is what it learned from context."""
    seq_len = model.config.sequence_len
    # at most LOGITS_PER_BATCH logits a forward pass: an open model's rows are long and its vocabulary large (the
    # rows come in the same order whatever the batch, so the measure stays the same)
    rows_per_batch = max(1, min(rows_per_batch, LOGITS_PER_BATCH // (seq_len * model.config.vocab_size)))
    rows = TokenRows(tokenizer, data.pretrain_files("val"), rows_per_batch, seq_len, slots=[0], num_slots=1, loop=False)
    num_batches = max(1, max_tokens // (rows_per_batch * seq_len)) if max_tokens > 0 else math.inf
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)  # how often each token is a target

    def batches():
        n = 0
        while n < num_batches:
            batch = rows.next_batch(0, device)
            if batch is None:
                return
            counts.add_(torch.bincount(batch[1].flatten().cpu(), minlength=tokenizer.vocab_size).double())
            n += 1
            yield batch

    token_bytes = torch.tensor(tokenizer.token_bytes, dtype=torch.long, device=device)
    bpb = evaluate_bpb(model, batches(), token_bytes, autocast_ctx)
    nbytes = torch.tensor(tokenizer.token_bytes, dtype=torch.float64)
    counts *= nbytes > 0  # special tokens stand for no text: left out, as evaluate_bpb does
    total = counts.sum()
    if total == 0:
        raise SystemExit(f"error: the held-out text is shorter than one batch of {rows_per_batch} rows of "
                         f"{seq_len} tokens; lower --batch_size")
    p = counts[counts > 0] / total
    bits_per_token = -(p * p.log2()).sum()  # the entropy of the unigram distribution
    unigram = bits_per_token * total / (counts * nbytes).sum()
    return {"bpb": bpb, "unigram_bpb": unigram.item(), "tokens": int(total)}

# -----------------------------------------------------------------------------
# Task: multiple choice


def mc_loglik_choices(model, tokenizer, items, autocast_ctx, rows_per_batch=16, max_len=0, chat=False):
    """Each choice as a continuation of its question; the choice with the lowest mean loss per token wins
    (nanochat's CORE; the mean, not the sum, so long choices are not penalised for their length). A base model
    reads `question + " " + choice`, scored after the tokens of the question alone; with chat, the question is a
    user turn and the choice the assistant's reply (no letters: the answer the model knows, whether or not it has
    learned to name it by a letter). max_len > 0 crops each row from the left. Returns the chosen index of each
    item."""
    rows, owners = [], []  # (ids, index of the first continuation token), and the item of each row
    for i, item in enumerate(items):
        if chat:
            context = tokenizer.render_for_completion([{"role": "user", "content": item["question"]}])
            candidates = [context + tokenizer.encode(choice) for choice in item["choices"]]
        else:
            context = tokenizer.encode(item["question"], prepend=tokenizer.bos_id)
            candidates = [tokenizer.encode(item["question"] + " " + choice, prepend=tokenizer.bos_id)
                          for choice in item["choices"]]
        for ids in candidates:
            # compare tokens, not text: where the question's last token merges with the choice, it counts as
            # part of the continuation
            start = next((j for j, (a, b) in enumerate(zip(context, ids)) if a != b), len(context))
            start = min(start, len(ids) - 1)  # an empty choice is still scored on its last token
            if max_len and len(ids) > max_len + 1:
                cut = len(ids) - max_len - 1
                ids, start = ids[cut:], max(1, start - cut)
            rows.append((ids, start))
            owners.append(i)
    device = next(model.parameters()).device
    losses = []
    for b in range(0, len(rows), rows_per_batch):
        chunk = rows[b:b + rows_per_batch]
        T = max(len(ids) for ids, _ in chunk) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)  # padding is never a target: any token does
        y = torch.full((len(chunk), T), -1, dtype=torch.long)  # -1: not scored
        for r, (ids, start) in enumerate(chunk):
            x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[r, start - 1:len(ids) - 1] = torch.tensor(ids[start:])
        x, y = x.to(device), y.to(device)
        with torch.no_grad(), autocast_ctx:
            loss = model(x, y, loss_reduction="none").float()  # (B, T)
        scored = y >= 0
        losses += ((loss * scored).sum(dim=1) / scored.sum(dim=1)).tolist()
    per_item = [[] for _ in items]
    for i, loss in zip(owners, losses):
        per_item[i].append(loss)
    return [min(range(len(ls)), key=ls.__getitem__) for ls in per_item]  # a tie goes to the earlier choice


def mc_letter_choices(model, tokenizer, items, autocast_ctx, rows_per_batch=16, max_len=0):
    """Chat models: the item as a user turn with lettered choices (data.mc_conversation, the SFT format); the
    model's answer is the letter, among the item's own, that it finds likeliest as the first token of its reply
    (nanochat's way: one forward pass, and a reply in some other format still gets read). max_len > 0 crops each
    prompt from the left. Returns the chosen index of each item."""
    letter_ids = []
    for letter in LETTERS:
        ids = tokenizer.encode(letter)
        assert len(ids) == 1, f"the choice letter {letter!r} is not one token"  # every byte is a token
        letter_ids.append(ids[0])
    prompts = []
    for item in items:
        if not 2 <= len(item["choices"]) <= len(LETTERS):
            raise ValueError(f"a multiple-choice item needs 2 to {len(LETTERS)} choices: {item['question'][:60]!r}")
        ids = tokenizer.render_for_completion(mc_conversation(item)[:1])
        prompts.append(ids[len(ids) - max_len:] if max_len and len(ids) > max_len else ids)
    device = next(model.parameters()).device
    chosen = []
    for b in range(0, len(prompts), rows_per_batch):
        chunk, chunk_items = prompts[b:b + rows_per_batch], items[b:b + rows_per_batch]
        x = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)  # padded on the right: causal
        for r, ids in enumerate(chunk):
            x[r, :len(ids)] = torch.tensor(ids)
        with torch.no_grad(), autocast_ctx:
            logits = model(x.to(device))  # (B, T, V)
        last = logits[torch.arange(len(chunk)), torch.tensor([len(ids) - 1 for ids in chunk])].float()  # (B, V)
        for r, item in enumerate(chunk_items):
            candidates = last[r, letter_ids[:len(item["choices"])]]  # (C,)
            chosen.append(int(candidates.argmax()))  # argmax: a tie goes to the earlier letter
    return chosen


def mc_metrics(items, chosen):
    """Accuracy, and the centred score: 0 at chance (the mean of 1/choices), 1 when all are right."""
    acc = sum(c == item["answer"] for c, item in zip(chosen, items)) / len(items)
    chance = sum(1 / len(item["choices"]) for item in items) / len(items)
    return {"acc": acc, "centered": (acc - chance) / (1 - chance), "n": len(items)}

# -----------------------------------------------------------------------------
# Task: math word problems

BASE_SHOTS = 3  # solved problems in a base model's prompt (fewer when they do not fit its context)


def fewshot_prompt(tokenizer, question, shots, limit):
    """A base model's prompt: solved problems as separate documents in the pretraining format (data/tinyworld.py's
    doc_problem: "Question: ...\\nAnswer: ...\\n#### N"), then the question. Each document begins with <|bos|>,
    as in pretraining, so a model that learned the format ends its answer with <|bos|> (a stop token). As many
    shots as keep the prompt within `limit` tokens. Returns (ids, the number of shots)."""
    for k in range(len(shots), -1, -1):
        ids = []
        for shot in shots[:k]:
            ids += tokenizer.encode(f"Question: {shot['question']}\nAnswer: {shot['answer']}", prepend=tokenizer.bos_id)
        ids += tokenizer.encode(f"Question: {question}\nAnswer:", prepend=tokenizer.bos_id)
        if len(ids) <= limit or k == 0:
            return ids, k


def completion_text(tokens, tokenizer, chat=True):
    """One generated answer as the text to grade: without the stop token that ended it. A base model may go on
    past its answer (to the next "Question:"), so its text ends at the first "#### N" line."""
    text = response_text(tokens, tokenizer)
    if not chat:
        text = text.split("\nQuestion:")[0]
        m = re.search(r"####[^\n]*", text)
        text = text[:m.end()] if m else text
    return text


def eval_math(engine, problems, prompts, *, chat=True, num_samples=1, vote=False, temperature=0.0, top_k=0,
              max_new_tokens=256, batch_size=16, seed=0, label="math"):
    """Generate num_samples answers to each prompt (batch_size problems per batch; the samples of one prompt share
    its prefill) and grade them against the problems' answers. Returns pass@1, pass@k (k = num_samples; the
    unbiased estimate, averaged over problems) and with vote maj@k: the most common extracted answer (equal
    answers grouped, ties to the first seen), graded."""
    k = num_samples
    keys = ["pass@1"] + ([f"pass@{k}"] if k > 1 else []) + ([f"maj@{k}"] if vote else [])
    sums = dict.fromkeys(keys, 0.0)
    pass1 = []  # per problem, for the slices
    t0 = time.time()
    for b in range(0, len(problems), batch_size):
        outs = engine.generate_batch(prompts[b:b + batch_size], num_samples=k, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_k=top_k, seed=seed + b)
        for problem, samples in zip(problems[b:b + batch_size], outs):
            texts = [completion_text(tokens, engine.tokenizer, chat) for tokens, _ in samples]
            correct = sum(grade(text, problem["answer"]) for text in texts)
            pass1.append(pass_at_k(k, correct, 1))
            sums["pass@1"] += pass1[-1]
            if k > 1:
                sums[f"pass@{k}"] += pass_at_k(k, correct, k)
            if vote:
                voted = majority_vote([extract_answer(text) for text in texts])
                sums[f"maj@{k}"] += voted is not None and grade(voted, problem["answer"])
        done = min(b + batch_size, len(problems))
        print(f"{label}: {done}/{len(problems)} problems, pass@1 {sums['pass@1'] / done:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)
    by_slice = {}
    for problem, p in zip(problems, pass1):
        by_slice.setdefault(problem.get("slice"), []).append(p)
    by_slice.pop(None, None)
    out = {**{key: total / len(problems) for key, total in sums.items()}, "n": len(problems)}
    if by_slice:  # problems that carry a "slice": pass@1 of each as well
        out["slices"] = {name: {"pass@1": sum(v) / len(v), "n": len(v)} for name, v in by_slice.items()}
    return out


def eval_chat(engine, probes, max_new_tokens=64, batch_size=16):
    """Chat retention: greedy replies to non-math prompts, each graded by data.chat_reply_ok. Returns the share
    handled, overall and per kind of prompt (identity, smalltalk, fact)."""
    handled = {}
    for b in range(0, len(probes), batch_size):
        chunk = probes[b:b + batch_size]
        prompts = [engine.tokenizer.render_for_completion([{"role": "user", "content": p["prompt"]}]) for p in chunk]
        outs = engine.generate_batch(prompts, num_samples=1, max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
        for probe, samples in zip(chunk, outs):
            reply = response_text(samples[0][0], engine.tokenizer)  # calculator calls spelled as special tokens
            handled.setdefault(probe["kind"], []).append(data.chat_reply_ok(reply, probe))
    every = [ok for oks in handled.values() for ok in oks]
    return {"handled": sum(every) / len(every), **{kind: sum(oks) / len(oks) for kind, oks in handled.items()},
            "n": len(every)}

# -----------------------------------------------------------------------------
# Which sets, and their results

TASKS = ("bpb", "mc", "math", "chat")


def datasets_of(tasks, names):
    """The sets each task runs on. Each name given goes to the task it belongs to (tinyworld to both); a task
    with none named runs its default: mc the built-in items and every downloaded set, math the built-in problems
    (generation is the slow task: a downloaded set is run when asked for)."""
    for name in names:
        kinds = [t for t, sets in (("mc", MC_SPLITS), ("math", MATH_SPLITS)) if name in sets]
        if not kinds:
            raise SystemExit(f"error: unknown --dataset {name!r}: expected one of "
                             f"{', '.join(dict.fromkeys([*MC_SPLITS, *MATH_SPLITS]))}")
        if not set(kinds) & set(tasks):
            raise SystemExit(f"error: --dataset={name} is a {' and '.join(kinds)} set, but --task has no "
                             f"{' or '.join(kinds)}")
    mc = [n for n in names if n in MC_SPLITS] or ["tinyworld"] + [
        n for n in MC_SPLITS if n != "tinyworld" and os.path.exists(os.path.join(data_dir(n), "test.jsonl"))]
    math_sets = [n for n in names if n in MATH_SPLITS] or ["tinyworld"]
    return {"mc": mc if "mc" in tasks else [], "math": math_sets if "math" in tasks else []}


def load_set(kind, name, limit):
    """The test rows of a set, the first `limit` (of each slice, for a math set with slices)."""
    try:
        rows = (data.load_mc if kind == "mc" else data.load_math)(name, "test")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if limit > 0:
        by_slice = {}  # a set without slices is one slice
        for r in rows:
            by_slice.setdefault(r.get("slice"), []).append(r)
        rows = [r for part in by_slice.values() for r in part[:limit]]
    if not rows:
        raise SystemExit(f"error: the {name} {kind} test set is empty")
    return rows


def math_prompts(tokenizer, name, problems, style, limit):
    """The prompts of a math set and how they were made: chat puts each question as a user turn; base puts solved
    problems of the same set (its train split, when on disk) before each, as many as fit in `limit` tokens; boxed
    is data.boxed_prompt's plain-text instruction."""
    if style in ("chat", "boxed"):
        return [data.math_prompt(tokenizer, p["question"], style) for p in problems], style
    try:
        shots = data.load_math(name, "train")[:BASE_SHOTS]
    except (FileNotFoundError, ValueError):
        shots = []
    prompts, used = zip(*(fewshot_prompt(tokenizer, p["question"], shots, limit) for p in problems))
    used = sorted(set(used))
    return list(prompts), f"{used[0]}-shot" if len(used) == 1 else f"{used[0]}- to {used[-1]}-shot"


def flat_metrics(results):
    """{"bpb": .., "mc/tinyworld/acc": .., "math/tinyworld/pass@1": ..}: every number of the results."""
    out = {}
    for name, r in results.items():
        for key, value in r.items():
            if key not in ("settings", "n", "tokens"):
                out[key if name == "bpb" else f"{name}/{key}"] = value
    return out


def metric_order(keys):
    """bpb first, then multiple choice, then math, then chat retention; within each, the order first seen."""
    rank = lambda k: 0 if k in ("bpb", "unigram_bpb") else 1 if k.startswith("mc/") else 3 if k.startswith(
        "chat/") else 2
    return sorted(dict.fromkeys(keys), key=rank)


def format_value(value):
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

# -----------------------------------------------------------------------------
# The report card: report.md from the sections the stages left in report/

STAGES = ("base", "sft", "rl")
TIMES = (("tokenizer", "tokenizer"), ("pretrain", "base"), ("sft", "sft"), ("rl", "rl"), ("eval", "eval"))


def config_line(config):
    return "`" + " ".join(f"{k}={v!r}" for k, v in sorted(config.items())) + "`"


# per training stage: its heading in the report, and its charts: (title, [(history series, label), ...])
STAGE_CHARTS = {
    "base": ("Pretraining (base)", [("Pretraining: training loss", [("loss", "train loss")]),
                                    ("Pretraining: validation bits per byte", [("val_bpb", "val bpb")])]),
    "sft": ("Chat fine-tuning (sft)", [("SFT: loss", [("loss", "train loss"), ("val_loss", "val loss")])]),
    "rl": ("Reinforcement learning (rl)", [("RL: reward and held-out pass@1", [
        ("reward", "reward"), ("pass1", "pass@1"), ("greedy_pass1", "greedy pass@1")])]),
}


def build_report(sections, seconds, environment_lines):
    """report.md's text and the summary dict of the last line."""
    minutes = {f"{key}_min": seconds[name] / 60 if name in seconds else None for key, name in TIMES}
    evals = {stage: sections[f"eval_{stage}"] for stage in STAGES if f"eval_{stage}" in sections}
    metric = lambda stage, key: evals.get(stage, {}).get("metrics", {}).get(key)
    base_bpb = metric("base", "bpb")
    if base_bpb is None:
        base_bpb = sections.get("base", {}).get("metrics", {}).get("val_bpb")
    summary = {"total_min": sum(seconds.values()) / 60 if seconds else None, **minutes, "bpb": base_bpb,
               "pass1_sft": metric("sft", "math/tinyworld/pass@1"), "pass1_rl": metric("rl", "math/tinyworld/pass@1"),
               "bpb_sft": metric("sft", "bpb"), "bpb_rl": metric("rl", "bpb"),
               "chat_sft": metric("sft", "chat/handled"), "chat_rl": metric("rl", "chat/handled")}

    out = ["# picochat report card", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", "",
           "## Environment", "", *environment_lines, ""]
    if evals:
        keys = metric_order(k for e in evals.values() for k in e.get("metrics", {}))
        out += ["## Metrics", "", common.markdown_table("metric", list(STAGES), keys,
                                                        lambda k, s: format_value(metric(s, k))), ""]
    if seconds:
        order = ["data"] + [name for _, name in TIMES]  # pipeline order, then any other timed stage
        stages = sorted(seconds, key=lambda n: order.index(n) if n in order else len(order))
        total = summary["total_min"]
        out += ["## Time", "", common.markdown_table("stage", ["minutes"], [*stages, "total"], lambda r, c: (
            f"{total if r == 'total' else seconds[r] / 60:.1f}")), ""]
    tok, tok_eval = sections.get("tokenizer", {}), sections.get("tokenizer_eval", {})
    if tok or tok_eval:
        out += ["## Tokenizer", ""]
        if "vocab_size" in tok:
            out.append(f"- vocabulary: {tok['vocab_size']:,} tokens, trained in {tok.get('train_seconds', 0):.1f}s")
        if "bytes_per_token" in tok_eval:
            out.append(f"- held-out text: {tok_eval['bytes_per_token']:.3f} bytes per token")
        if "config" in tok:
            out.append(f"- config: {config_line(tok['config'])}")
        out.append("")
    for stage in (s for s in STAGES if s in sections):
        sec, (heading, charts) = sections[stage], STAGE_CHARTS[stage]
        out += [f"## {heading}", ""]
        if sec.get("checkpoint"):
            out.append(f"- checkpoint: `{sec['checkpoint']}`")
        metrics = {k: v for k, v in sec.get("metrics", {}).items() if isinstance(v, (int, float))}
        if metrics:
            out.append("- metrics: " + ", ".join(f"{k} {format_value(v)}" for k, v in metrics.items()))
        if "config" in sec:
            out.append(f"- config: {config_line(sec['config'])}")
        out.append("")
        history = sec.get("history", {})
        for title, names in charts:
            series = {label: history[key] for key, label in names if history.get(key)}
            if series:
                out += [common.svg_chart(series, title), ""]
    for stage, sec in evals.items():
        ckpt = sec.get("checkpoint", {})
        out += [f"## Evaluation of {stage}", "", f"- checkpoint: {ckpt.get('stage', stage)}, "
                f"tag {ckpt.get('model_tag', '?')}, step {ckpt.get('step', '?')}"]
        out += [f"- {name}: " + ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items())
                for name, r in sec.get("results", {}).items()]
        out.append("")
    return "\n".join(out), summary


def write_report():
    """Regenerate report.md; print its path, then the summary JSON as the last line."""
    report_dir = os.path.join(common.get_base_dir(), "report")
    sections, seconds = common.read_report_sections(report_dir)
    text, summary = build_report(sections, seconds, common.environment())
    path = os.path.join(report_dir, "report.md")
    common.atomic_write_text(path, text)
    print(f"report card: {path} ({len(sections)} sections)")
    print(json.dumps(summary))
    return summary

# -----------------------------------------------------------------------------
if __name__ == "__main__":
    config = common.configure(globals())
    if report:
        write_report()
        raise SystemExit(0)

    # ---- settings that cannot work, refused before any time is spent
    tasks = [t.strip() for t in task.split(",") if t.strip()]
    errors = []
    if not tasks or set(tasks) - set(TASKS):
        errors.append(f"--task must name some of {', '.join(TASKS)} (comma-separated), got {task!r}")
    if source not in (*STAGES, "all") and common.open_model_dir(source) is None:
        errors.append(f"--source must be base, sft, rl, all, hf:<org>/<name> or a model folder, got {source!r}")
    if prompt_style not in ("", "chat", "base", "boxed"):
        errors.append(f"--prompt_style must be chat, base or boxed (or empty: automatic), got {prompt_style!r}")
    for name, value, low in (("num_samples", num_samples, 1), ("max_new_tokens", max_new_tokens, 1),
                             ("batch_size", batch_size, 1), ("max_problems", max_problems, 0),
                             ("eval_tokens", eval_tokens, 0), ("top_k", top_k, 0)):
        if value < low:
            errors.append(f"--{name} must be >= {low}, got {value}")
    if temperature < 0:
        errors.append(f"--temperature must be >= 0, got {temperature}")
    if quantize not in ("", *QUANT_FORMATS):
        errors.append(f"--quantize must be {' or '.join(QUANT_FORMATS)}, got {quantize!r}")
    if vote and num_samples < 2:
        errors.append("--vote=1 takes the majority of several answers: give --num_samples=K with K > 1")
    if errors:
        raise SystemExit("error: " + "; ".join(errors))
    if num_samples > 1 and temperature == 0:
        # greedy decoding would give K copies of one answer, making pass@K = pass@1
        temperature = config["temperature"] = 1.0
        print(f"--num_samples={num_samples} needs sampling: temperature set to 1.0")
    names = datasets_of(tasks, [d.strip() for d in dataset.split(",") if d.strip()])

    # ---- which checkpoints, then the data: what is missing is found before any work
    if source == "all":
        ckpts = os.path.join(common.get_base_dir(), "checkpoints")
        sources = [s for s in STAGES if glob.glob(os.path.join(ckpts, s, model_tag or "*", "meta_*.json"))]
        if not sources:
            raise SystemExit(f"error: no base, sft or rl checkpoint under {ckpts}")
    else:
        sources = [source]
    tags = {stage: common.find_model_tag(stage, model_tag) for stage in sources}
    sets = {kind: {name: load_set(kind, name, max_problems) for name in names[kind]} for kind in ("mc", "math")}
    if "chat" in tasks:
        probes = data.load_chat_probes("test")
        probes = probes[:max_problems] if max_problems > 0 else probes
    _, _, _, _, device = common.setup_device(device)
    # the weights in the compute dtype, no autocast: generation under bf16 autocast casts every weight at every
    # decoded token (measured 2.1x slower per token than fp32 weights at Qwen3-0.6B's shape on a CPU, README.md)
    weights = torch.bfloat16 if common.resolve_dtype(device, dtype) == "bfloat16" else torch.float32
    autocast_ctx = contextlib.nullcontext()  # for the scorers' forward passes: the weights' dtype, as above

    # ---- evaluate each, and leave its report section
    all_metrics = {}
    for stage in sources:
        common.seed_everything(seed)
        model, tokenizer, meta = common.load_model(stage, device, tags[stage], step, weights)
        if quantize:
            try:
                quantize_model(model, quantize)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
        checkpoint = {"stage": stage, "model_tag": tags[stage], "step": meta["step"],
                      **({"quantize": quantize} if quantize else {})}
        weights_note = f", {quantize} weights" if quantize else ""
        print(f"== {stage} (tag {tags[stage]}, step {meta['step']}{weights_note}): {', '.join(tasks)}", flush=True)
        style = prompt_style or ("chat" if stage in ("sft", "rl") else "base")
        t0, results, chat = time.time(), {}, style == "chat"
        context = model.context_len  # the longest sequence the model can take
        if "bpb" in tasks:
            r = eval_bpb(model, tokenizer, device, autocast_ctx, eval_tokens, batch_size)
            results["bpb"] = {**r, "settings": {"eval_tokens": eval_tokens}}
            print(f"bpb: {r['bpb']:.4f} (unigram baseline {r['unigram_bpb']:.4f}) on {r['tokens']:,} tokens",
                  flush=True)
        for name, items in sets["mc"].items():
            r = mc_metrics(items, mc_loglik_choices(model, tokenizer, items, autocast_ctx, batch_size, context, chat))
            if chat:  # and nanochat's letter: naming the answer by its letter is a skill of its own
                letter = mc_metrics(items, mc_letter_choices(model, tokenizer, items, autocast_ctx, batch_size,
                                                             context))
                r.update(acc_letter=letter["acc"], centered_letter=letter["centered"])
            results[f"mc/{name}"] = {**r, "settings": {"max_problems": max_problems,
                                                       "scoring": "reply loglik, letter" if chat else "loglik"}}
            letter_note = f"; by letter: acc {r['acc_letter']:.4f}, centred {r['centered_letter']:.4f}" if chat else ""
            print(f"mc/{name}: acc {r['acc']:.4f}, centred {r['centered']:.4f} ({r['n']} items){letter_note}",
                  flush=True)
        for name, problems in sets["math"].items():
            # a base model's shots only as far as its trained context allows
            prompts, made = math_prompts(tokenizer, name, problems, style, model.config.sequence_len - max_new_tokens)
            longest = max(map(len, prompts))
            if longest + max_new_tokens > context:
                raise SystemExit(f"error: a {name} prompt of {longest} tokens + --max_new_tokens={max_new_tokens} "
                                 f"is more than the model can take ({context} tokens); lower --max_new_tokens")
            # a base model's answer ends at its first "#### N" line; others are graded whole (their last answer)
            r = eval_math(Engine(model, tokenizer, compile_generate), problems, prompts, chat=style != "base",
                          num_samples=num_samples, vote=vote, temperature=temperature, top_k=top_k,
                          max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, label=f"math/{name}")
            slices = r.pop("slices", {})
            results[f"math/{name}"] = {**r, "settings": {
                "max_problems": max_problems, "num_samples": num_samples, "vote": vote, "temperature": temperature,
                "top_k": top_k, "max_new_tokens": max_new_tokens, "seed": seed, "prompt": made, "dtype": str(weights)}}
            for slice_name, rs in slices.items():
                results[f"math/{name}/{slice_name}"] = rs
                print(f"math/{name}/{slice_name}: pass@1 {rs['pass@1']:.4f} ({rs['n']} problems)", flush=True)
        if "chat" in tasks and chat:
            r = eval_chat(Engine(model, tokenizer, compile_generate), probes, batch_size=batch_size)
            results["chat"] = {**r, "settings": {"max_problems": max_problems}}
            print("chat retention: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "n") +
                  f" ({r['n']} prompts)", flush=True)
        all_metrics[stage] = flat_metrics(results)
        # an open model's section is named by its folder; a quantized model's goes beside, not instead
        section_name = f"eval_{stage if stage in STAGES else tags[stage]}" + (f"_{quantize}" if quantize else "")
        path = os.path.join(common.get_base_dir(), "report", f"{section_name}.json")
        if os.path.exists(path):  # earlier results on this same checkpoint stay, unless measured again now
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
            if previous.get("checkpoint") == checkpoint:
                results = {**previous.get("results", {}), **results}
        section = {"stage": "eval", "checkpoint": checkpoint, "config": config, "results": results,
                   "metrics": flat_metrics(results), "minutes": (time.time() - t0) / 60}
        print(f"report section: {common.write_report_section(section_name, section)}")
        del model

    # ---- the summary table
    keys = metric_order(k for m in all_metrics.values() for k in m)
    print()
    print(common.markdown_table("metric", sources, keys, lambda k, s: format_value(all_metrics[s].get(k))))
