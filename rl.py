"""
Reinforcement learning with verifiable rewards on math word problems (the GRPO family), or DPO on preference pairs.
The policy samples a group of answers per problem with the KV-cache engine (calculator included), the verifier
(evaluate.grade) scores them 1/0, and each answer is pushed up or down by how much better it did than its group.

    python rl.py                                    # the latest sft model on the built-in problems (CPU-sized)
    python rl.py --dataset=gsm8k --max_new_tokens=256 --num_steps=300   # GSM8K (after python data/gsm8k.py)
    python rl.py --loss_norm=sequence --std_norm=1 --kl_coef=0.04       # GRPO as published (DeepSeekMath)
    python rl.py --loss_norm=constant               # Dr.GRPO: no length bias, no std division
    python rl.py --ppo_epochs=2 --clip_low=0.2 --clip_high=0.28 --filter_zero_std=1   # DAPO-style
    python rl.py --algo=dpo                         # DPO on correct/incorrect pairs sampled from the sft model
    python rl.py --algo=dpo --pairs=prefs.jsonl     # DPO on your pairs: {"prompt", "chosen", "rejected"} per line
    torchrun --nproc_per_node=8 rl.py --dataset=gsm8k   # each rank samples its share of every step's prompts
    python rl.py --resume=1                         # continue the latest rl checkpoint of this model tag

Defaults are nanochat's simple on-policy variant of GRPO: no reference model or KL, one gradient step per batch
(so no ratio clipping), advantage = reward - group mean without std division, DAPO's token-level normalisation.
Reads $PICOCHAT_DIR/checkpoints/<source>/, writes $PICOCHAT_DIR/checkpoints/rl/<model tag>/ and report/rl.json.

What it learns on the built-in problems (tests/bench_rl.py, a 4-layer 128-wide model, 2 CPU cores): in 60 steps
(~5 minutes) held-out pass@1 at temperature 1 goes from 0.45 to 0.74 and greedy from 0.49 to 0.82, mostly because
the policy learns to call the calculator (39% -> 92% of answers): its own arithmetic is what fails, and answers
that use the tool are the ones rewarded. RL needs an sft model that already solves some problems: one with 1%
pass@1 gave all-zero groups and nothing to learn from.
"""

import copy
import json
import math
import os
import random
import re
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common
from common import print0

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
algo = "grpo"               # grpo: policy gradient with group baselines (all knobs below) | dpo: preference pairs
source = "sft"              # the checkpoint to start from (and the frozen reference for kl_coef and DPO)
model_tag = ""              # default: the source's latest; the rl checkpoints go to the same tag
source_step = -1            # the source's step; -1: its latest
dataset = "tinyworld"       # math problems: tinyworld (built in) or gsm8k (python data/gsm8k.py)
# sampling
prompts_per_step = 16       # problems per step, over all ranks (each rank samples its share)
num_samples = 8             # answers sampled per problem: the group its baseline comes from
max_new_tokens = 96         # an answer longer than this is cut (and scores what it says so far)
temperature = 1.0           # sampling temperature, for training and for the pass@k evaluation
top_k = 50                  # sample from the k most likely tokens (0: all)
# rewards and advantages
format_reward = 0.0         # bonus for ending the turn with a final "#### N" line, right or wrong (0: none)
std_norm = False            # also divide advantages by the group's std (GRPO); off: Dr.GRPO, nanochat
filter_zero_std = False     # drop groups whose rewards are all equal (DAPO's dynamic sampling, without refill)
# the loss
loss_norm = "token"         # token: sum / all tokens (DAPO) | sequence: per-answer mean, then mean (GRPO) |
                            # constant: sum / (answers * max_new_tokens) (Dr.GRPO)
ppo_epochs = 1              # optimiser steps on each batch of samples; > 1 reuses them with PPO's clipped ratio
clip_low = 0.2              # the ratio may fall to 1 - clip_low before its gradient stops (PPO)
clip_high = 0.28            # ... and rise to 1 + clip_high (DAPO's clip-higher keeps rare tokens explorable)
kl_coef = 0.0               # weight of the k3 KL estimate against the frozen source model (0: no reference)
# DPO
beta = 0.1                  # DPO's inverse temperature: how far the policy may move from the reference
pairs = ""                  # jsonl of {"prompt", "chosen", "rejected"}; "": derive them from sampled answers
dpo_problems = 256          # train problems sampled (num_samples answers each) to derive pairs when pairs is ""
# optimisation
num_steps = 60              # optimisation steps (ppo_epochs each)
lr_scale = 0.1              # multiplies the model's default learning rates (nanochat's init_lr_frac: 0.05)
weight_decay = 0.0
device_batch_size = 32      # sequences per forward/backward (memory only: gradients accumulate over a step)
# evaluation, checkpoints
eval_every = 20             # held-out pass@1 / pass@k every this many steps (and at the start and the end)
eval_problems = 128         # held-out test problems per evaluation (all ranks together)
eval_samples = 4            # answers per problem: pass@1 averages them, pass@k is over all of them
eval_greedy = True          # also greedy pass@1 (one more answer per problem)
save_every = 0              # checkpoint every this many steps (0: only at the end)
resume = False              # continue from the latest rl checkpoint of this model tag
# system
device = ""                 # cuda|mps|cpu; "": the best available
dtype = ""                  # bfloat16|float32; "": bfloat16 on cuda, float32 elsewhere (fp32 is faster on most CPUs)
seed = 42

# -----------------------------------------------------------------------------
# Rewards and advantages

FINAL_LINE = re.compile(r"(?:^|\n)#### *-?\d[\d,]*(?:\.\d+)?\s*$")  # the answer convention of every math dataset


def response_text(tokens, tokenizer):
    """The answer as text, without the stop token that ended it (the verifier reads the last line)."""
    stops = (tokenizer.special("<|assistant_end|>"), tokenizer.bos_id)
    return tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in stops else tokens)


def score(text, reference, finished, grader, format_bonus=0.0):
    """(reward, correct) of one answer: 1 when the verifier says its final answer equals the reference's, plus
    format_bonus when it ended its turn on a well-formed "#### N" line (a dense signal while correct answers are
    rare; keep it small, or the policy learns the format and stops there)."""
    correct = bool(grader(text, reference))
    well_formed = finished and FINAL_LINE.search(text) is not None
    return float(correct) + format_bonus * well_formed, correct


def group_advantages(rewards, std_norm=False, eps=1e-4):
    """rewards (P, G): G answers to each of P problems -> advantages (P, G). The group mean is the baseline
    (GRPO: no value network); std_norm divides by the group's std as GRPO does, which Dr.GRPO drops because it
    up-weights problems that are nearly always or nearly never solved."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if std_norm:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)  # unbiased std, as GRPO implementations use
    return adv


# -----------------------------------------------------------------------------
# Batches: a prompt plus a sampled answer as one training row, and the per-token weights of the loss


def make_row(prompt, tokens, mask):
    """One sample as (inputs, targets, trained): inputs predict targets = the next tokens; trained is 1 where the
    target is a token the policy chose, 0 on the prompt and on forced calculator outputs (the engine's mask)."""
    full = prompt + tokens
    return full[:-1], full[1:], [0] * (len(prompt) - 1) + list(mask)


def collate(rows, device):
    """Right-padded (B, T) tensors of inputs, targets (-1 where not trained: the model skips them) and the mask."""
    T = max(len(x) for x, _, _ in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T); padding is never a target, its value is moot
    y = torch.full((len(rows), T), -1, dtype=torch.long)  # (B, T)
    m = torch.zeros(len(rows), T)  # (B, T)
    for i, (xi, yi, mi) in enumerate(rows):
        mi = torch.tensor(mi, dtype=torch.float32)
        x[i, :len(xi)] = torch.tensor(xi)
        y[i, :len(yi)] = torch.where(mi > 0, torch.tensor(yi), -1)
        m[i, :len(mi)] = mi
    return x.to(device), y.to(device), m.to(device)


def token_weights(mask, loss_norm, num_seqs, num_tokens, max_new_tokens):
    """mask (B, T) -> weights (B, T) that turn a sum of per-token losses into the chosen average over the whole
    step. num_seqs and num_tokens count the step's sequences and trained tokens over all micro-batches and ranks,
    so the average is the same however the batch is split."""
    if loss_norm == "token":  # DAPO: every token weighs the same, so long answers are not diluted
        return mask / num_tokens
    if loss_norm == "sequence":  # GRPO: each answer's mean, then their mean (a short answer's tokens weigh more)
        return mask / (mask.sum(dim=1, keepdim=True).clamp(min=1) * num_seqs)
    if loss_norm == "constant":  # Dr.GRPO: one constant divisor, so the length of an answer biases nothing
        return mask / (num_seqs * max_new_tokens)
    raise ValueError(f"loss_norm must be token, sequence or constant, got {loss_norm!r}")


def token_logprobs(model, x, y):
    """log p(target) per position, (B, T) float32; 0 where the target is -1."""
    return -model(x, y, loss_reduction="none").float()


# -----------------------------------------------------------------------------
# The losses


def policy_loss(logp, old_logp, advantages, weights, clip_low, clip_high, ref_logp=None, kl_coef=0.0):
    """PPO's clipped surrogate, as GRPO/DAPO use it, summed with the per-token weights. logp, old_logp, ref_logp,
    weights: (B, T); advantages: (B,). Returns (loss, kl), kl the weighted mean k3 estimate (0 without a ref).
    On the first epoch old_logp == logp (detached): the ratio is 1 and its gradient is that of logp, so this is
    REINFORCE with the group baseline; later epochs reuse the samples, and the clip stops a token's gradient
    once its probability has moved more than the clip range in the direction its advantage pushes."""
    ratio = torch.exp(logp - old_logp)  # (B, T)
    adv = advantages[:, None]  # (B, 1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)  # (B, T)
    per_token = -surrogate
    kl = torch.zeros((), device=logp.device)
    if kl_coef > 0:
        # k3 (Schulman): exp(r) - r - 1 with r = log(ref/pi) is unbiased for KL(pi||ref) and never negative
        delta = ref_logp - logp  # (B, T)
        k3 = torch.exp(delta) - delta - 1  # (B, T)
        per_token = per_token + kl_coef * k3
        kl = (k3 * weights).sum().detach()
    return (per_token * weights).sum(), kl


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), mean over pairs.
    Each argument (N,) is an answer's log-probability summed over its tokens. Returns (loss, accuracy): the share
    of pairs whose implicit reward already prefers the chosen answer."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))  # (N,)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


# -----------------------------------------------------------------------------
# Problems and DPO pairs


def step_indices(step, count, num_items, seed):
    """Indices of a step's items: consecutive slices of a shuffled order, reshuffled at every pass over the data.
    The same on every rank and after a resume (it depends only on the step)."""
    out, orders = [], {}
    for i in range(step * count, (step + 1) * count):
        epoch, j = divmod(i, num_items)
        if epoch not in orders:
            orders[epoch] = list(range(num_items))
            random.Random(seed * 1000 + epoch).shuffle(orders[epoch])
        out.append(orders[epoch][j])
    return out


def pair_from_json(row, tokenizer):
    """A {"prompt", "chosen", "rejected"} row -> (prompt ids, (chosen tokens, mask), (rejected tokens, mask)).
    prompt: a user message (str) or a list of messages ending with a user turn; chosen/rejected: an assistant
    content (str, or a list of text/python/python_output parts)."""
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
        answers.append((ids[len(prompt):], mask[len(prompt):]))
    return prompt, answers[0], answers[1]


def load_pairs(path, tokenizer):
    from data import read_jsonl
    if not os.path.exists(path):
        raise SystemExit(f"error: --pairs file {path} not found")
    out = []
    for i, row in enumerate(read_jsonl(path)):
        try:
            out.append(pair_from_json(row, tokenizer))
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: {path} line {i + 1}: {e}") from None
    if not out:
        raise SystemExit(f"error: {path} holds no pairs")
    return out


def pairs_from_groups(prompts, groups):
    """DPO pairs from sampled groups: for each problem, its first correct answer against its first wrong one.
    groups: per prompt a list of ((tokens, mask), correct)."""
    out = []
    for prompt, group in zip(prompts, groups):
        right = [s for s, ok in group if ok]
        wrong = [s for s, ok in group if not ok]
        if right and wrong:
            out.append((prompt, right[0], wrong[0]))
    return out


# -----------------------------------------------------------------------------
# Helpers the loop uses


def all_sum(values, device):
    """Sum numbers over ranks (as they are without DDP)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def sample_groups(engine, prompts, references, n, max_tokens, temp, topk, seed, grader, format_bonus):
    """Sample n answers per prompt and score them. Returns per prompt a list of (tokens, mask, reward, correct)."""
    outs = engine.generate_batch(prompts, num_samples=n, max_new_tokens=max_tokens, temperature=temp, top_k=topk,
                                 seed=seed)
    end = engine.tokenizer.special("<|assistant_end|>")
    groups = []
    for samples, reference in zip(outs, references):
        group = []
        for tokens, mask in samples:
            text = response_text(tokens, engine.tokenizer)
            reward, correct = score(text, reference, bool(tokens) and tokens[-1] == end, grader, format_bonus)
            group.append((tokens, mask, reward, correct))
        groups.append(group)
    return groups


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
    ddp, rank, local_rank, world_size, device = common.setup_device(device)
    common.seed_everything(seed)
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    autocast_ctx = common.autocast(device, dtype)

    # ---- settings that cannot work, refused before any time is spent
    errors = []
    if algo not in ("grpo", "dpo"):
        errors.append(f"--algo must be grpo or dpo, got {algo!r}")
    if loss_norm not in ("token", "sequence", "constant"):
        errors.append(f"--loss_norm must be token, sequence or constant, got {loss_norm!r}")
    if algo == "grpo" and num_samples < 2:
        errors.append("--num_samples must be at least 2: the group mean is the baseline")
    if pairs and algo != "dpo":
        errors.append("--pairs is for --algo=dpo")
    if prompts_per_step % world_size:
        errors.append(f"--prompts_per_step={prompts_per_step} must be a multiple of the {world_size} processes")
    if min(prompts_per_step, num_steps, max_new_tokens, ppo_epochs, device_batch_size, eval_samples) < 1:
        errors.append("prompts_per_step, num_steps, max_new_tokens, ppo_epochs, device_batch_size and "
                      "eval_samples must be at least 1")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        errors.append(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if errors:
        raise SystemExit("error: " + "; ".join(errors))

    # ---- model, tokenizer, the frozen reference
    from model import Engine
    from evaluate import grade, pass_at_k
    model, tokenizer, source_meta = common.load_model(source, device, model_tag, source_step)
    out_tag = model_tag or common.find_model_tag(source)
    ckpt_dir = common.checkpoint_dir("rl", out_tag)
    if max_new_tokens >= model.config.sequence_len:
        raise SystemExit(f"error: --max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"sequence_len={model.config.sequence_len}")
    reference = copy.deepcopy(model).eval().requires_grad_(False) if algo == "grpo" and kl_coef > 0 else None
    engine = Engine(model, tokenizer)

    # ---- problems: train prompts to learn on, held-out test prompts to measure
    from data import load_math
    try:
        train_set, test_set = load_math(dataset, "train"), load_math(dataset, "test")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    room = model.config.sequence_len - max_new_tokens

    def encode(problem_list):
        """(prompt ids, reference answer) of each problem that leaves max_new_tokens of room in the context."""
        out = [(tokenizer.render_for_completion([{"role": "user", "content": p["question"]}]), p["answer"])
               for p in problem_list]
        return [(ids, answer) for ids, answer in out if len(ids) <= room]

    train_items = encode(train_set)
    rng = random.Random(seed)
    test_items = encode(rng.sample(test_set, min(eval_problems, len(test_set))))
    print0(f"data: {dataset}, {len(train_items)} train problems, {len(test_items)} held-out problems per evaluation")
    if not train_items:
        raise SystemExit(f"error: no train problem fits sequence_len={model.config.sequence_len} with "
                         f"max_new_tokens={max_new_tokens}")

    # ---- DPO pairs, and the reference's log-probs of them (computed once: the reference never changes)
    my_share = prompts_per_step // world_size
    if algo == "dpo":
        if pairs:
            pair_list = load_pairs(pairs, tokenizer)
        else:
            # every rank samples its share of the problems, then all ranks pool the pairs in the same order
            t0 = time.time()
            picked = [train_items[i] for i in step_indices(0, dpo_problems, len(train_items), seed)]
            mine = picked[rank::world_size]
            model.eval()
            found = []
            for j, i in enumerate(range(0, len(mine), my_share)):
                chunk = mine[i:i + my_share]
                with autocast_ctx:
                    groups = sample_groups(engine, [p for p, _ in chunk], [a for _, a in chunk], num_samples,
                                           max_new_tokens, temperature, top_k, seed + 7919 * (j * world_size + rank),
                                           grade, 0.0)
                found += pairs_from_groups([p for p, _ in chunk], [[((t, m), ok) for t, m, _, ok in g] for g in groups])
            if ddp:
                gathered = [None] * world_size
                dist.all_gather_object(gathered, found)
                found = [p for part in gathered for p in part]
            pair_list = found
            print0(f"dpo: {len(pair_list)} pairs from {len(picked)} problems x {num_samples} answers "
                   f"({time.time() - t0:.0f}s)")
            if not pair_list:
                raise SystemExit("error: no problem got both a right and a wrong answer: no pairs to learn from "
                                 "(try more --dpo_problems, another --temperature, or give --pairs)")
        rows_c = [make_row(p, *c) for p, c, _ in pair_list]
        rows_r = [make_row(p, *r) for p, _, r in pair_list]
        model.eval()
        ref_c = sequence_logprobs(model, rows_c, device, autocast_ctx, device_batch_size)  # (N,)
        ref_r = sequence_logprobs(model, rows_r, device, autocast_ctx, device_batch_size)  # (N,)

    # ---- optimisers
    optimizers = model.setup_optimizers(weight_decay=weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["initial_lr"] * lr_scale
    step, history = 0, {}
    if resume and common.last_step(ckpt_dir) is not None:
        meta, _ = common.resume_checkpoint(ckpt_dir, model, optimizers, rank, device,
                                           {"world_size": world_size, "prompts_per_step": prompts_per_step})
        step, history = meta["step"], meta["history"]
    elif resume:
        print0(f"nothing to resume in {ckpt_dir}: starting from the {source} model")

    def log_point(name, value):
        history.setdefault(name, []).append((step, value))

    @torch.no_grad()
    def evaluate_heldout():
        """pass@1 (the mean over eval_samples answers at the training temperature), pass@k (k = eval_samples) and
        greedy pass@1 on the held-out problems, each rank taking its share. The seed is the same at every
        evaluation, so the curve shows changes of the model, not of the sampling noise."""
        mine = test_items[rank::world_size]
        sums = [0.0, 0.0, 0.0, 0.0]  # pass@1, pass@k, greedy, problems
        for i in range(0, len(mine), my_share):
            chunk = mine[i:i + my_share]
            prompts, refs = [p for p, _ in chunk], [a for _, a in chunk]
            with autocast_ctx:
                groups = sample_groups(engine, prompts, refs, eval_samples, max_new_tokens, temperature, top_k,
                                       seed + 100003 * (rank + 1) + i, grade, 0.0)
                if eval_greedy:
                    greedy = sample_groups(engine, prompts, refs, 1, max_new_tokens, 0.0, 0, None, grade, 0.0)
                    sums[2] += sum(g[0][3] for g in greedy)
            for group in groups:
                c = sum(s[3] for s in group)
                sums[0] += pass_at_k(eval_samples, c, 1)
                sums[1] += pass_at_k(eval_samples, c, eval_samples)
                sums[3] += 1
        p1, pk, greedy_p1, n = all_sum(sums, device)
        out = {"pass1": p1 / n, f"pass{eval_samples}": pk / n}
        if eval_greedy:
            out["greedy_pass1"] = greedy_p1 / n
        return out

    def save(step, metrics):
        meta = {"step": step, "model_config": source_meta["model_config"], "config": config, "metrics": metrics,
                "tokenizer_hash": tokenizer.hash, "world_size": world_size, "history": history,
                "source": {"stage": source, "model_tag": out_tag, "step": source_meta["step"]}}
        rank_state = {"optimizers": [opt.state_dict() for opt in optimizers]}
        common.save_checkpoint(ckpt_dir, step, model.state_dict(), rank_state, meta, rank)
        print0(f"saved checkpoint step {step} to {ckpt_dir}")

    # ---- the training loop
    t_start, train_time, metrics, last_eval = time.time(), 0.0, {}, {}
    while True:
        last = step == num_steps
        evaluated = history.get("pass1", [[None]])[-1][0] == step  # a resumed run's last step was evaluated
        if eval_every > 0 and (step % eval_every == 0 or last) and test_items and not evaluated:
            model.eval()
            t0 = time.time()
            last_eval = evaluate_heldout()
            for k, v in last_eval.items():
                log_point(k, v)
            print0(f"step {step:05d} | held-out " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()) +
                   f" | {time.time() - t0:.0f}s")
        if last:
            break
        t0 = time.time()
        lrm = 1.0 - step / num_steps  # linear decay to 0, as nanochat's RL
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm

        if algo == "dpo":
            # ---- one DPO step: this rank's share of the step's pairs, the loss averaged over them
            idx = step_indices(step, prompts_per_step, len(pair_list), seed)[rank * my_share:(rank + 1) * my_share]
            model.train()
            pol_c = sequence_logprobs(model, [rows_c[i] for i in idx], device, autocast_ctx, device_batch_size, True)
            pol_r = sequence_logprobs(model, [rows_r[i] for i in idx], device, autocast_ctx, device_batch_size, True)
            loss, acc = dpo_loss(pol_c, pol_r, ref_c[idx], ref_r[idx], beta)
            loss.backward()  # the optimisers average over ranks: each rank's share is the same size
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            step += 1
            loss_v, acc_v = (v / world_size for v in all_sum([loss.item(), acc.item()], device))
            log_point("loss", loss_v)
            log_point("reward_accuracy", acc_v)
            train_time += time.time() - t0
            print0(f"step {step:05d}/{num_steps:05d} | dpo loss {loss_v:.4f} | reward accuracy {acc_v:.3f} | "
                   f"lr x{lrm:.3f} | {time.time() - t0:.1f}s")
            metrics = {"loss": loss_v, "reward_accuracy": acc_v}
        else:
            # ---- 1. sample a group of answers for each of this rank's problems, and score them
            idx = step_indices(step, prompts_per_step, len(train_items), seed)[rank * my_share:(rank + 1) * my_share]
            chunk = [train_items[i] for i in idx]
            model.eval()
            with autocast_ctx:
                groups = sample_groups(engine, [p for p, _ in chunk], [a for _, a in chunk], num_samples,
                                       max_new_tokens, temperature, top_k, seed + world_size * step + rank, grade,
                                       format_reward)
            t_sample = time.time() - t0
            rewards = torch.tensor([[s[2] for s in g] for g in groups])  # (P, G)
            advantages = group_advantages(rewards, std_norm)  # (P, G)
            zero_std = (rewards.max(dim=1).values == rewards.min(dim=1).values)  # (P,)

            # ---- 2. the training rows: the answers of the groups kept, with their advantages
            rows, row_adv, counted = [], [], [0, 0]  # counted: the answers and tokens the loss averages over
            for (prompt, _), group, adv, flat in zip(chunk, groups, advantages, zero_std):
                if filter_zero_std and flat:
                    continue  # all answers equal: DAPO leaves them out of the average too
                for (tokens, mask, _, _), a in zip(group, adv.tolist()):
                    row = make_row(prompt, tokens, mask)
                    counted[0] += 1
                    counted[1] += sum(row[2])
                    if a != 0 or kl_coef > 0:  # a zero advantage has exactly zero policy gradient: skip its pass
                        rows.append(row)
                        row_adv.append(a)
            n_seqs, n_tokens, n_rows, n_correct, n_len, n_flat = all_sum(
                [*counted, len(rows), sum(s[3] for g in groups for s in g), sum(len(s[0]) for g in groups for s in g),
                 float(zero_std.sum())], device)
            batches = [(collate(rows[i:i + device_batch_size], device),
                        torch.tensor(row_adv[i:i + device_batch_size], device=device))
                       for i in range(0, len(rows), device_batch_size)]

            # ---- 3. the reference's log-probs (for the KL term), before any update
            ref_logps = []
            if reference is not None:
                with torch.no_grad(), autocast_ctx:
                    ref_logps = [token_logprobs(reference, x, y) for (x, y, _), _ in batches]  # each (B, T)

            # ---- 4. ppo_epochs optimiser steps on these samples
            model.train()
            old_logps, loss_v, kl_v, clipped = [], 0.0, 0.0, 0.0
            for epoch in range(ppo_epochs if n_rows > 0 else 0):
                loss_sum, kl_sum, clip_sum = 0.0, 0.0, 0.0
                for b, ((x, y, m), adv) in enumerate(batches):
                    weights = token_weights(m, loss_norm, n_seqs, n_tokens, max_new_tokens)  # (B, T)
                    with autocast_ctx:
                        logp = token_logprobs(model, x, y)  # (B, T)
                    if epoch == 0:
                        # the weights have not moved yet, so these are the sampling policy's log-probs: keeping
                        # them saves the separate no-grad pass PPO needs before its first epoch
                        old_logps.append(logp.detach())
                    loss, kl = policy_loss(logp, old_logps[b], adv, weights, clip_low, clip_high,
                                           ref_logps[b] if ref_logps else None, kl_coef)
                    (loss * world_size).backward()  # the optimisers average over ranks; the weights already divide
                    loss_sum += loss.item()
                    kl_sum += kl.item()
                    ratio = torch.exp(logp.detach() - old_logps[b])
                    clip_sum += (((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float() * m).sum().item()
                if not rows:  # this rank kept nothing but others did: join the optimisers' gradient averaging
                    for p in model.parameters():
                        p.grad = torch.zeros_like(p)
                for opt in optimizers:
                    opt.step()
                model.zero_grad(set_to_none=True)
                loss_v, kl_v, clip_n = all_sum([loss_sum, kl_sum, clip_sum], device)
                clipped = clip_n / max(n_tokens, 1)
            step += 1

            # ---- 5. log
            n_answers = prompts_per_step * num_samples
            reward_v = all_sum([float(rewards.sum())], device)[0] / n_answers
            train_metrics = {"reward": reward_v, "accuracy": n_correct / n_answers, "response_len": n_len / n_answers,
                             "zero_std": n_flat / prompts_per_step, "loss": loss_v}
            if kl_coef > 0:
                train_metrics["kl"] = kl_v
            if ppo_epochs > 1:
                train_metrics["clipped"] = clipped
            for k, v in train_metrics.items():
                log_point(k, v)
            train_time += time.time() - t0
            print0(f"step {step:05d}/{num_steps:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in train_metrics.items())
                   + f" | lr x{lrm:.3f} | sample {t_sample:.1f}s, train {time.time() - t0 - t_sample:.1f}s")
            metrics = train_metrics
        if save_every > 0 and step % save_every == 0 and step < num_steps:
            save(step, {**metrics, **last_eval})

    # ---- the end: final checkpoint and report section
    metrics = {**metrics, **last_eval, "train_minutes": train_time / 60, "wall_minutes": (time.time() - t_start) / 60}
    first = {k: v[0][1] for k, v in history.items() if k in last_eval and v and v[0][0] == 0}
    metrics.update({f"{k}_start": v for k, v in first.items()})
    save(step, metrics)
    if rank == 0:
        path = common.write_report_section("rl", {"stage": "rl", "algo": algo, "config": config, "metrics": metrics,
                                                  "history": history, "checkpoint": ckpt_dir})
        print0(f"report section: {path}")
    common.teardown()
