"""
Benchmark: the post-training methods side by side, each from the same sft model and given the same time: GRPO
(rl.py), PPO (rl.py --algo=ppo), DPO (dpo.py) and distillation (sft.py --distill_from: expert iteration, the sft
model trained on its own verified answers). Every resulting model, and the sft model, is then measured here alike:
- held-out pass@1 on the test word problems (sampled at temperature 1, and greedy), and per slice when the data
  has slices (tinyworld's math_test "slice": id, phrasing, composition, length, meaning, arith); `reworded`: greedy
  pass@1 on the 300 reworded word problems of tests/heldback.py (phrasings and shapes the generator does not know);
- chat retention: `chat_ok`, the share of non-math prompts answered as chat (no "####" line, no calculator call;
  with the data's chat probe set, chat_probe_test.jsonl, its held-out phrasings graded by data.chat_reply_ok, which
  also wants the fact asked for; without one, the first turns of the val chats whose answer is not math);
  `held_chat`, the share of tests/heldback.py's 48 chat probes handled (its grade_chat); `chat_loss`, the loss on
  the val conversations' assistant tokens (sft.py's val loss).

    python tests/bench_rl.py                        # the sft model in $PICOCHAT_DIR, or builds a small one first
    PICOCHAT_DIR=/tmp/pc python tests/bench_rl.py --grpo_steps=20 --methods=ppo   # GRPO always runs

Equal time: GRPO runs grpo_steps steps and its wall time (model loading and sampling included, evaluation off) is
every method's budget; the others are sized to it from a short timing run of their own (probe_steps steps; DPO and
distillation on 16 problems). PPO gets the steps that fit. DPO and distillation sample as many problems as fit
when each is then trained on for a few epochs (DPO_EPOCHS over its pairs, DISTILL_EPOCHS over the kept answers), the
cost of an answer taken from GRPO's sampling time and their yield (pairs, kept answers) from the timing run. The
table gives the minutes each run really took and the answers it sampled. Without an sft checkpoint in
$PICOCHAT_DIR it builds the small CPU pipeline first through the stage scripts (~35 minutes on 2 busy shared cores).
Each method runs in $PICOCHAT_DIR/bench_rl/<method>/ (links to the tokenizer, the data and the sft model), its log
beside it. The last line is one JSON object: {"<method>": {"minutes", "steps", "answers", "pass1", ...}, ...}, the
sft model's included.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import common  # noqa: E402
import data  # noqa: E402
from bench_generalise import shown_text  # noqa: E402
from tests import heldback  # noqa: E402
from data.grade import grade, pass_rates  # noqa: E402
from data.loader import Row, collate, token_logprobs  # noqa: E402
from model import Engine  # noqa: E402

# -----------------------------------------------------------------------------
# Settings (--key=value)
methods = "grpo,ppo,dpo,distill"
grpo_steps = 30             # GRPO's steps (16 problems x 8 answers each): its time is every method's budget
probe_steps = 2             # steps of the timing runs
eval_problems = 200         # held-out problems measured per model, drawn at random once (0: all)
eval_samples = 4            # sampled answers per problem (pass@1 is their mean), plus one greedy answer
chat_prompts = 100          # non-math prompts answered (greedy) per model
threads = 1                 # torch threads here and in every run (tiny matmuls lose to thread hand-offs)
for arg in sys.argv[1:]:
    key, value = arg.removeprefix("--").split("=", 1)
    if key not in globals() or key.startswith("_"):
        raise SystemExit(f"error: unknown setting --{key}")
    globals()[key] = type(globals()[key])(value)

# the small pipeline: a 4-layer model on the built-in data, sized for a CPU
PIPELINE = [
    ["data/tinyworld.py"],
    ["tokenizer.py", "--vocab_size=4096"],
    ["pretrain.py", "--depth=4", "--aspect_ratio=32", "--max_seq_len=256", "--device_batch_size=16",
     "--total_batch_size=8192", "--num_iterations=500", "--eval_every=250", "--dtype=float32"],
    # 300 steps at lr_scale 0.2: the sft model must solve some problems for RL to have a signal (100 steps at
    # 0.1 left val loss at 1.13 and held-out pass@1 at 1%: rewards were almost all 0)
    ["sft.py", "--max_seq_len=256", "--device_batch_size=16", "--total_batch_size=8192", "--num_iterations=300",
     "--lr_scale=0.2", "--eval_every=150", "--dtype=float32"],
]
PROMPTS, SAMPLES, NEW_TOKENS = 16, 8, 96  # every method samples as rl.py does by default
DPO_EPOCHS, DISTILL_EPOCHS = 4, 3  # passes over the pairs / the kept answers (dpo.py's defaults make ~6 on its pairs)
PER_STEP = {"dpo": PROMPTS, "distill": 32}  # pairs per DPO step; rows per SFT step (8192 tokens / 256)
COMMON = ["--eval_every=0", "--dtype=float32", f"--max_new_tokens={NEW_TOKENS}"]


def command(method, tag, problems, steps):
    """The command line of a method's run: sampling for `problems` problems (DPO, distillation), then `steps`
    training steps (distillation: 0 is DISTILL_EPOCHS epochs over the answers it kept)."""
    if method in ("grpo", "ppo"):
        extra = ["--algo=ppo", "--ppo_epochs=2"] if method == "ppo" else []
        return ["rl.py", f"--model_tag={tag}", f"--num_steps={steps}", *extra, *COMMON]
    if method == "dpo":
        return ["dpo.py", f"--model_tag={tag}", f"--num_steps={steps}", f"--dpo_problems={problems}", *COMMON]
    return ["sft.py", "--source=sft", f"--model_tag={tag}", f"--out_tag={tag}-distill", "--distill_from=sft",
            f"--distill_tag={tag}", f"--distill_problems={problems}", f"--distill_samples={SAMPLES}",
            f"--distill_max_new_tokens={NEW_TOKENS}", "--mixture=0", "--max_seq_len=256", "--device_batch_size=16",
            f"--total_batch_size={PER_STEP['distill'] * 256}", "--lr_scale=0.1", "--eval_every=0", "--dtype=float32",
            f"--num_iterations={steps}" if steps else f"--num_epochs={DISTILL_EPOCHS}"]


def items_per_problem(method, log):
    """What a problem yields for training, from a run's log: DPO pairs, or SFT rows of kept answers."""
    if method == "dpo":
        pairs, problems = re.search(r"dpo: (\d+) pairs from (\d+) problems", log).groups()
        return int(pairs) / int(problems)
    rows, problems = re.search(r"-> (\d+) rows", log).group(1), re.search(r"of (\d+) problems", log).group(1)
    return int(rows) / int(problems)


def run(args, base, log=None):
    """python ARGS with $PICOCHAT_DIR=base; returns (wall seconds, stdout). Output goes to the terminal, or to log."""
    print("$ " + " ".join(["python", *args]) + (f"  (log: {log})" if log else ""), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PICOCHAT_DIR": base, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True, text=True,
                         stdout=subprocess.PIPE if log else None).stdout or ""
    if log:
        common.atomic_write_text(log, out)
    return time.time() - t0, out


def run_dir(base, method, tag):
    """A fresh $PICOCHAT_DIR for one method: links to base's tokenizer, data and sft model (nothing else)."""
    path = os.path.join(base, "bench_rl", method)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.join(path, "checkpoints", "sft"))
    os.makedirs(os.path.join(path, "data"))
    os.symlink(os.path.join(base, "tokenizer"), os.path.join(path, "tokenizer"))
    for name in os.listdir(os.path.join(base, "data")):
        if name != "distill":
            os.symlink(os.path.join(base, "data", name), os.path.join(path, "data", name))
    os.symlink(os.path.join(base, "checkpoints", "sft", tag), os.path.join(path, "checkpoints", "sft", tag))
    return path


def train_seconds(path, stage):
    """Seconds the last run spent in its training loop, from its report section."""
    with open(os.path.join(path, "report", f"{stage}.json")) as f:
        metrics = json.load(f)["metrics"]
    return 60 * (metrics["train_minutes"] if "train_minutes" in metrics else metrics["minutes"])

# -----------------------------------------------------------------------------
# Measuring a model: held-out pass@1 (per slice) and chat retention


def test_problems():
    problems = data.load_math("tinyworld", "test")
    if eval_problems and eval_problems < len(problems):
        problems = random.Random(0).sample(problems, eval_problems)
    return problems


def chat_probes(tinyworld):
    """(probes, grader(probe, reply)): the data's held-out chat probes, else the non-math first turns of its val
    chats."""
    path = os.path.join(tinyworld, "chat_probe_test.jsonl")
    if os.path.exists(path):
        return data.read_jsonl(path)[:chat_prompts], lambda probe, reply: data.chat_reply_ok(reply, probe)
    chats = [row["messages"] for row in data.read_jsonl(os.path.join(tinyworld, "chat_val.jsonl"))]
    probes = [{"prompt": c[0]["content"], "kind": "chat", "expect": None} for c in chats
              if c[0]["role"] == "user" and isinstance(c[1]["content"], str) and "####" not in c[1]["content"]]

    def as_chat(probe, reply):
        return "####" not in reply and "<<" not in reply
    return probes[:chat_prompts], as_chat


def share_right(engine, probes, questions, grader, batch=64):
    """The share of probes whose greedy reply to their one-turn question grader(probe, reply) accepts, the reply as
    chat.py shows it (calculator calls as <<expr=result>>)."""
    right = 0
    for i in range(0, len(questions), batch):
        prompts = [engine.tokenizer.render_for_completion([{"role": "user", "content": q}])
                   for q in questions[i:i + batch]]
        outs = engine.generate_batch(prompts, num_samples=1, max_new_tokens=256, temperature=0.0)
        right += sum(grader(p, shown_text(o[0][0], engine.tokenizer)) for p, o in zip(probes[i:i + batch], outs))
    return right / len(questions)


def chat_loss(model, tokenizer):
    """Mean loss (nats) on the assistant tokens of the val conversations: sft.py's val loss, unpacked."""
    rows = []
    for messages in data.load_conversations("val"):
        try:
            ids, mask = tokenizer.render_conversation(messages, max_len=model.config.sequence_len + 1)
        except ValueError:
            continue
        rows.append(Row(ids[:-1], ids[1:], mask[1:]))
    nats, count = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            x, y, m = collate(rows[i:i + 32], "cpu")
            nats -= token_logprobs(model, x, y).sum().item()
            count += m.sum().item()
    return nats / count


def measure(base, stage, tag):
    """The numbers of one model: pass@1 overall and per slice, greedy pass@1, reworded pass@1, the chat measures."""
    os.environ["PICOCHAT_DIR"] = base
    model, tokenizer, _ = common.load_model(stage, "cpu", tag)
    engine = Engine(model, tokenizer)
    t0 = time.time()
    by_slice = {}
    for p in test_problems():
        prompt = tokenizer.render_for_completion([{"role": "user", "content": p["question"]}])
        by_slice.setdefault(p.get("slice", "all"), []).append((prompt, p["answer"]))
    out, n = {"pass1": 0.0, "greedy_pass1": 0.0}, sum(len(items) for items in by_slice.values())
    for name, items in sorted(by_slice.items()):
        rates = pass_rates(engine, items, num_samples=eval_samples, greedy=True, chunk_size=PROMPTS,
                           max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=50, seed=0, grader=grade, rank=0,
                           world_size=1, device="cpu")
        out["pass1"] += rates["pass1"] * len(items) / n
        out["greedy_pass1"] += rates["greedy_pass1"] * len(items) / n
        if len(by_slice) > 1:
            out[f"pass1_{name}"] = rates["pass1"]
    held = heldback.word_problems()
    out["reworded"] = share_right(engine, held, [p.question for p in held], heldback.grade_math)
    probes, reply_ok = chat_probes(data.ensure_tinyworld())
    out["chat_ok"] = share_right(engine, probes, [p["prompt"] for p in probes], reply_ok)
    held = heldback.chat_probes()
    out["held_chat"] = share_right(engine, held, [p.question for p in held], heldback.grade_chat)
    out["chat_loss"] = chat_loss(model, tokenizer)
    print(f"measured {stage}/{tag} in {base}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()) +
          f" ({time.time() - t0:.0f}s)", flush=True)
    return out


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    torch.set_num_threads(threads)
    base = common.get_base_dir()
    sft_dir = os.path.join(base, "checkpoints", "sft")
    if not (os.path.isdir(sft_dir) and any(common.last_step(os.path.join(sft_dir, t)) is not None
                                           for t in os.listdir(sft_dir))):
        print(f"no sft checkpoint in {base}: building the small pipeline first", flush=True)
        t0 = time.time()
        for args in PIPELINE:
            if args[0] == "data/tinyworld.py" and os.path.exists(os.path.join(base, "data", "tinyworld", "meta.json")):
                continue
            if args[0] == "tokenizer.py" and os.path.exists(os.path.join(base, "tokenizer", "tokenizer.json")):
                continue
            run(args, base)
        print(f"pipeline built in {(time.time() - t0) / 60:.1f} min", flush=True)
    tag = common.find_model_tag("sft")
    others = [m for m in methods.split(",") if m and m != "grpo"]
    if not set(others) <= {"ppo", "dpo", "distill"}:
        raise SystemExit(f"error: --methods are grpo, ppo, dpo and distill, got {methods!r}")
    results = {"sft": {"minutes": 0.0, "steps": 0, "answers": 0, **measure(base, "sft", tag)}}

    # ---- GRPO sets the budget, and the sampling cost per answer
    path = run_dir(base, "grpo", tag)
    budget, out = run(command("grpo", tag, 0, grpo_steps), path, os.path.join(path, "run.log"))
    per_answer = sum(float(s) for s in re.findall(r"sample ([\d.]+)s", out)) / (grpo_steps * PROMPTS * SAMPLES)
    print(f"budget: {budget / 60:.1f} min (GRPO, {grpo_steps} steps; {per_answer * 1000:.0f} ms per sampled answer)")
    results["grpo"] = {"minutes": budget / 60, "steps": grpo_steps, "answers": grpo_steps * PROMPTS * SAMPLES,
                       **measure(path, "rl", tag)}

    # ---- the others: a timing run, then the run that fits the budget
    for method in others:
        path = run_dir(base, method, tag)
        stage = "sft" if method == "distill" else "rl"
        wall, out = run(command(method, tag, PROMPTS, probe_steps), path, os.path.join(path, "probe.log"))
        per_step = train_seconds(path, stage) / probe_steps
        if method == "ppo":
            problems, steps = 0, max(1, int((budget - (wall - per_step * probe_steps)) / per_step))
            answers = steps * PROMPTS * SAMPLES
        else:
            fixed = wall - per_step * probe_steps - per_answer * PROMPTS * SAMPLES  # loading, writing
            epochs = DPO_EPOCHS if method == "dpo" else DISTILL_EPOCHS
            train_share = epochs * items_per_problem(method, out) / PER_STEP[method] * per_step  # s per problem
            problems = max(PROMPTS, int((budget - fixed) / (per_answer * SAMPLES + train_share)))
            answers = problems * SAMPLES
            steps = max(1, round(epochs * items_per_problem(method, out) * problems / PER_STEP[method]))
        path = run_dir(base, method, tag)
        wall, out = run(command(method, tag, problems, 0 if method == "distill" else steps), path,
                        os.path.join(path, "run.log"))
        if method == "distill":
            steps = int(re.search(r"(\d+) steps of", out).group(1))
        out_tag = f"{tag}-distill" if method == "distill" else tag
        results[method] = {"minutes": wall / 60, "steps": steps, "answers": answers, **measure(path, stage, out_tag)}

    # ---- the table, then the JSON line
    columns = [c for c in results["sft"] if c not in ("minutes", "steps", "answers")]
    print(f"\nfrom sft/{tag}; budget {budget / 60:.1f} min; {eval_problems or 'all'} held-out problems x "
          f"{eval_samples} samples + greedy; chat: {chat_prompts} prompts; torch threads {threads}\n")
    print(common.markdown_table("method", ["minutes", "steps", "answers"] + columns, list(results),
                                lambda r, c: f"{results[r][c]:.3f}" if isinstance(results[r][c], float)
                                else str(results[r][c])))
    print(json.dumps(results))
