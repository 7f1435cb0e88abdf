"""
DPO (direct preference optimisation) on pairs of answers: the policy learns to prefer the chosen answer of each
pair over the rejected one, measured against the frozen model it starts from. The pairs come from a file, or from
the sft model itself: it samples answers to the built-in (or GSM8K) train problems, and each problem that got both
a right and a wrong answer (graded by data/grade.py) gives one pair. (The GRPO family of RL: rl.py.)

    python dpo.py                                   # pairs sampled from the latest sft model, built-in problems
    python dpo.py --pairs=prefs.jsonl               # your pairs: {"prompt", "chosen", "rejected"} per line
    python dpo.py --dataset=gsm8k --max_new_tokens=256   # pairs from GSM8K (after python data/gsm8k.py)
    torchrun --nproc_per_node=8 dpo.py              # each rank samples and trains on its share
    python dpo.py --resume=1                        # continue the latest checkpoint of this model tag
    torchrun --nproc_per_node=8 dpo.py --zero=2     # optimiser states and gradients sharded (3: weights too)
    python dpo.py --lora_rank=16                    # LoRA; the reference is the base, adapters off

DPO is the other way through the post-training stage: like rl.py it reads $PICOCHAT_DIR/checkpoints/<source>/ and
writes $PICOCHAT_DIR/checkpoints/rl/<model tag>/ and report/rl.json, so evaluate.py and chat.py take its model as
the rl one. Held-out pass@1 is measured as rl.py measures it.
"""

import os
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
from common import print0
from data import iter_jsonl
from data.grade import grade, pass_rates, sample_groups
from data.loader import collate, make_row, math_items, step_indices, token_logprobs
from model import Engine, lora_disabled, merge_lora

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
source = "sft"              # the model to start from, which is also the frozen reference: a stage (sft, mid,
                            # base), or an open model: hf:<org>/<name> or a folder
model_tag = ""              # default: the source's latest; the checkpoints go to rl/ under the same tag
source_step = -1            # the source's step; -1: its latest
dataset = "tinyworld"       # math problems to sample pairs from and to measure on: tinyworld or gsm8k
prompt_style = "chat"       # how a problem is put: chat (a user turn) | boxed (plain text asking for a final
                            # \boxed{} answer: for a base model, as reasoning-from-scratch trains Qwen3-0.6B-Base)
# pairs
pairs = ""                  # jsonl of {"prompt", "chosen", "rejected"}; "": derive them from sampled answers
dpo_problems = 256          # train problems sampled (num_samples answers each) to derive pairs when pairs is ""
num_samples = 8             # answers sampled per problem when deriving pairs
max_new_tokens = 96         # longest sampled answer (pairs and evaluation)
temperature = 1.0           # sampling temperature, for the pairs and for the pass@k evaluation
top_k = 50                  # sample from the k most likely tokens (0: all)
beta = 0.1                  # DPO's inverse temperature: how far the policy may move from the reference
# optimisation
prompts_per_step = 16       # pairs per step, over all ranks (each rank trains on its share)
num_steps = 60
optimizer = ""              # muon: picochat's AdamW + Muon at lr_scale x its rates | adamw: AdamW at lr on every
                            # weight | "": adamw for an open model (or a checkpoint trained from one), else muon
lr_scale = 0.1              # muon: multiplies the model's default learning rates
lr = 1e-5                   # adamw: the learning rate (pretrained models fine-tune at ~1e-5)
weight_decay = 0.0
device_batch_size = 32      # sequences per forward/backward (memory only)
# evaluation, checkpoints
eval_every = 20             # held-out pass@1 / pass@k every this many steps (and at the start and the end)
eval_problems = 128         # held-out test problems per evaluation (all ranks together)
eval_samples = 4            # answers per problem: pass@1 averages them, pass@k is over all of them
eval_greedy = True          # also greedy pass@1 (one more answer per problem)
save_every = 0              # checkpoint every this many steps (0: only at the end)
resume = False              # continue from the latest rl checkpoint of this model tag
# LoRA: low-rank adapters on a frozen base instead of training every weight (model.py's add_lora)
lora_rank = 0               # > 0: adapters of this rank; checkpoints then hold the adapters alone and name their base
lora_alpha = 32.0           # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0          # dropout on the adapters' input
lora_targets = "q,k,v,o,up,down"  # attention's q, k, v and output projections; the MLP's up and down projections
lora_merge = False          # the last checkpoint: the full model, the adapters merged into the base
quantize = ""               # QLoRA: the frozen base stored as int8 (per channel) or int4 (per group of 64 inputs)
# system
device = ""                 # cuda|mps|cpu; "": the best available
compile_generate = False    # decode through a torch.compile'd step (model.generate's compile): compiling takes
                            # tens of seconds on a CPU, paid back by long generations (tests/bench_generate.py)
dtype = ""                  # bfloat16|float32; "": bfloat16 on CUDA and AMX CPUs, else float32
zero = 0                    # data parallelism: 0 replicated, 1 optimiser states sharded, 2 + gradients, 3 + weights
seed = 42

# -----------------------------------------------------------------------------
# Pairs and the loss


class Answer(NamedTuple):
    tokens: list  # the assistant's reply, ending with <|assistant_end|>
    mask: list  # 1 on the tokens it wrote, 0 on calculator outputs


class Pair(NamedTuple):
    prompt: list  # token ids up to <|assistant_start|>
    chosen: Answer
    rejected: Answer


def pair_from_json(row, tokenizer):
    """A {"prompt", "chosen", "rejected"} row -> a Pair. prompt: a user message (str) or a list of messages ending
    with a user turn; chosen/rejected: an assistant content (str, or a list of text/python/python_output parts)."""
    if not all(k in row for k in ("prompt", "chosen", "rejected")):
        raise ValueError(f"a pair needs keys prompt, chosen and rejected; got {sorted(row)}")
    messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
    prompt = tokenizer.render_for_completion(messages)
    answers = []
    for key in ("chosen", "rejected"):
        ids, mask = tokenizer.render_conversation(list(messages) + [{"role": "assistant", "content": row[key]}],
                                                  max_len=1 << 30)
        if ids[:len(prompt)] != prompt:
            raise ValueError("the prompt does not render as the start of the conversation")
        answers.append(Answer(ids[len(prompt):], mask[len(prompt):]))
    return Pair(prompt, *answers)


def load_pairs(path, tokenizer):
    if not os.path.exists(path):
        raise SystemExit(f"error: --pairs file {path} not found")
    out = []
    try:
        for i, row in iter_jsonl(path):
            try:
                out.append(pair_from_json(row, tokenizer))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}, line {i}: {e}") from None
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON, not a pair
        raise SystemExit(f"error: {e}") from None
    if not out:
        raise SystemExit(f"error: {path} holds no pairs")
    return out


def pairs_from_groups(prompts, groups):
    """Pairs from sampled groups: for each problem, its first correct answer against its first wrong one.
    groups: per prompt a list of (answer, correct)."""
    out = []
    for prompt, group in zip(prompts, groups):
        right = [answer for answer, ok in group if ok]
        wrong = [answer for answer, ok in group if not ok]
        if right and wrong:
            out.append(Pair(prompt, right[0], wrong[0]))
    return out


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over pairs.
    Each argument (N,) is an answer's log-probability summed over its tokens. Returns (loss, accuracy): the share
    of pairs whose implicit reward already prefers the chosen answer."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))  # (N,)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def sequence_logprobs(model, rows, device, autocast_ctx, batch_size, grad=False):
    """Sum of log p over each row's trained tokens, (N,); with grad=False under no_grad."""
    out = []
    with torch.set_grad_enabled(grad):
        for i in range(0, len(rows), batch_size):
            x, y, m = collate(rows[i:i + batch_size], device)
            with autocast_ctx:
                logp = token_logprobs(model, x, y)  # (B, T)
            out.append((logp * m).sum(dim=1))  # (B,)
    return torch.cat(out)


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    config = common.configure(globals())
    common.check_settings(config, positive=("lr_scale", "lr", "beta"), non_negative=("weight_decay", "temperature"))
    rank, world_size, device, dtype, autocast_ctx = common.start_stage(device, dtype, seed)

    # ---- settings that cannot work, refused before any time is spent
    errors = []
    if prompts_per_step % world_size:
        errors.append(f"--prompts_per_step={prompts_per_step} must be a multiple of the {world_size} processes")
    if min(prompts_per_step, num_steps, max_new_tokens, device_batch_size, eval_samples, num_samples) < 1:
        errors.append("prompts_per_step, num_steps, max_new_tokens, device_batch_size, eval_samples and "
                      "num_samples must be at least 1")
    if prompt_style not in ("chat", "boxed"):
        errors.append(f"--prompt_style must be chat or boxed, got {prompt_style!r}")
    if errors:
        raise SystemExit("error: " + "; ".join(errors))

    # ---- model, tokenizer; the problems
    model, tokenizer, source_meta = common.load_model(source, device, model_tag, source_step)
    out_tag = model_tag or common.find_model_tag(source)
    ckpt_dir = common.checkpoint_dir("rl", out_tag)
    lora_meta = common.setup_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets, quantize, lora_merge,
                                  {"stage": source, "model_tag": out_tag, "step": source_meta["step"]}, seed)
    if max_new_tokens >= model.config.sequence_len:
        raise SystemExit(f"error: --max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"sequence_len={model.config.sequence_len}")
    engine = Engine(model, tokenizer, compile_generate)
    train_items, test_items = math_items(tokenizer, dataset, model.config.sequence_len - max_new_tokens,
                                         eval_problems, seed, prompt_style)
    my_share = prompts_per_step // world_size

    # ---- the pairs, and the reference's log-probs of them (once: the reference never changes)
    model.eval()
    if pairs:
        pair_list = load_pairs(pairs, tokenizer)
    else:
        # every rank samples its share of the problems, then all ranks pool the pairs in the same order
        t0 = time.time()
        picked = [train_items[i] for i in step_indices(0, dpo_problems, len(train_items), seed)]
        mine = picked[rank::world_size]
        pair_list = []
        for i in range(0, len(mine), my_share):
            chunk = mine[i:i + my_share]
            with autocast_ctx:
                groups = sample_groups(engine, [p for p, _ in chunk], [a for _, a in chunk], num_samples=num_samples,
                                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       seed=common.derive_seed(seed, "pairs", i, rank), grader=grade)
            pair_list += pairs_from_groups([p for p, _ in chunk],
                                           [[(Answer(s.tokens, s.mask), s.correct) for s in g] for g in groups])
        if dist.is_initialized():
            gathered = [None] * world_size
            dist.all_gather_object(gathered, pair_list)
            pair_list = [pair for part in gathered for pair in part]
        print0(f"dpo: {len(pair_list)} pairs from {len(picked)} problems x {num_samples} answers "
               f"({time.time() - t0:.0f}s)")
        if not pair_list:
            raise SystemExit("error: no problem got both a right and a wrong answer: no pairs to learn from "
                             "(try more --dpo_problems, another --temperature, or give --pairs)")
    rows_chosen = [make_row(pair.prompt, *pair.chosen) for pair in pair_list]
    rows_rejected = [make_row(pair.prompt, *pair.rejected) for pair in pair_list]
    with lora_disabled(model):  # with LoRA the reference is the base, adapters off: no second copy
        ref_chosen = sequence_logprobs(model, rows_chosen, device, autocast_ctx, device_batch_size)  # (N,)
        ref_rejected = sequence_logprobs(model, rows_rejected, device, autocast_ctx, device_batch_size)  # (N,)

    # ---- data parallelism and optimisers, resume (on any number of ranks)
    optimizers = common.stage_optimizers(model, zero, optimizer, lr, lr_scale, weight_decay,
                                         source_meta.get("open_model"))
    step, history, _ = common.resume_stage(resume, ckpt_dir, model, optimizers, rank, device, {
        "prompts_per_step": prompts_per_step, "optimizer": optimizer}, history={})

    def log_point(name, value):
        history.setdefault(name, []).append((step, value))

    def save(step, metrics):
        common.save_stage(ckpt_dir, step, model, optimizers, rank, {
            "config": config, "metrics": metrics, "history": history, "tokenizer_hash": tokenizer.hash,
            "source": {"stage": source, "model_tag": out_tag, "step": source_meta["step"]},
            "open_model": source_meta.get("open_model"), **lora_meta})

    # ---- the training loop
    t_start, train_time, metrics, last_eval = time.time(), 0.0, {}, {}
    while True:
        last = step == num_steps
        evaluated = history.get("pass1", [[None]])[-1][0] == step  # a resumed run's last step was evaluated
        if eval_every > 0 and (step % eval_every == 0 or last) and test_items and not evaluated:
            model.eval()
            t0 = time.time()
            with common.unsharded(model), autocast_ctx:  # each rank generates its own answers
                last_eval = pass_rates(engine, test_items, num_samples=eval_samples, greedy=eval_greedy,
                                       chunk_size=my_share, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_k=top_k, seed=seed, grader=grade, rank=rank, world_size=world_size,
                                       device=device)
            for k, v in last_eval.items():
                log_point(k, v)
            print0(f"step {step:05d} | held-out " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()) +
                   f" | {time.time() - t0:.0f}s")
        if last:
            break
        t0 = time.time()
        lrm = 1.0 - step / num_steps  # linear decay to 0
        common.set_lr(optimizers, lrm)

        # this rank's share of the step's pairs, the loss averaged over them
        idx = step_indices(step, prompts_per_step, len(pair_list), seed)[rank * my_share:(rank + 1) * my_share]
        model.train()
        policy_chosen = sequence_logprobs(model, [rows_chosen[i] for i in idx], device, autocast_ctx,
                                          device_batch_size, grad=True)  # (P,)
        policy_rejected = sequence_logprobs(model, [rows_rejected[i] for i in idx], device, autocast_ctx,
                                            device_batch_size, grad=True)  # (P,)
        picked = common.to_device(torch.tensor(idx), device)  # a list as an index would be a blocking copy
        loss, accuracy = dpo_loss(policy_chosen, policy_rejected, ref_chosen[picked], ref_rejected[picked], beta)
        loss.backward()  # the optimisers average over ranks: each rank's share is the same size
        total = common.all_sum({"loss": loss, "reward_accuracy": accuracy, "gradient": common.largest_grad(model)},
                               device)  # the step's one host read
        # before the update: a diverged step never lands
        common.check_finite(step + 1, total, "--lr or --lr_scale, --beta")
        del total["gradient"]
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        step += 1
        metrics = {name: value / world_size for name, value in total.items()}  # the means over ranks
        for k, v in metrics.items():
            log_point(k, v)
        train_time += time.time() - t0
        print0(f"step {step:05d}/{num_steps:05d} | dpo loss {metrics['loss']:.4f} | "
               f"reward accuracy {metrics['reward_accuracy']:.3f} | lr x{lrm:.3f} | {time.time() - t0:.1f}s")
        if save_every > 0 and step % save_every == 0 and step < num_steps:
            save(step, {**metrics, **last_eval})

    # ---- the end: final checkpoint and report section
    metrics = {**metrics, **last_eval, "train_minutes": train_time / 60, "wall_minutes": (time.time() - t_start) / 60}
    first = {k: v[0][1] for k, v in history.items() if k in last_eval and v and v[0][0] == 0}
    metrics.update({f"{k}_start": v for k, v in first.items()})
    if lora_merge:  # the last checkpoint: the full model, the adapters folded into the base
        merge_lora(model)
        lora_meta = {"merged_lora": lora_meta["lora"]}
    save(step, metrics)
    common.finish_stage("rl", {"stage": "rl", "algo": "dpo", "config": config, "metrics": metrics,
                               "history": history, "checkpoint": ckpt_dir}, rank)
