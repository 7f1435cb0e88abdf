"""
Reinforcement learning with verifiable rewards on math word problems: the GRPO family. The policy samples a group
of answers per problem with the KV-cache engine (calculator included), the verifier (data/grade.py) scores them 1/0,
and each answer is pushed up or down by how much better it did than its group. (DPO on preference pairs: dpo.py.)

    python rl.py                                    # the latest sft model on the built-in problems (CPU-sized)
    python rl.py --dataset=gsm8k --max_new_tokens=256 --num_steps=300   # GSM8K (after python data/gsm8k.py)
    python rl.py --loss_norm=sequence --std_norm=1 --kl_coef=0.04       # GRPO as published (DeepSeekMath)
    python rl.py --loss_norm=constant               # Dr.GRPO: no length bias, no std division
    python rl.py --ppo_epochs=2 --clip_low=0.2 --clip_high=0.28 --filter_zero_std=1   # DAPO-style
    torchrun --nproc_per_node=8 rl.py --dataset=gsm8k   # each rank samples its share of every step's prompts
    torchrun --nproc_per_node=8 rl.py --zero=3      # optimiser states, gradients and weights sharded (see common.py)
    python rl.py --source=hf:Qwen/Qwen3-0.6B-Base --dataset=gsm8k   # an open model: AdamW at 1e-5 (README.md)
    python rl.py --resume=1                         # continue the latest rl checkpoint of this model tag
    python rl.py --lora_rank=16 --kl_coef=0.04      # LoRA; the KL reference is the base, adapters off

Defaults are nanochat's simple on-policy variant of GRPO: no reference model or KL, one gradient step per batch
(so no ratio clipping), advantage = reward - group mean without std division, DAPO's token-level normalisation.
RL needs an sft model that already solves some problems: groups whose answers are all wrong teach nothing (what
it learns on the built-in problems: README.md, tests/bench_rl.py).
Reads $PICOCHAT_DIR/checkpoints/<source>/, writes $PICOCHAT_DIR/checkpoints/rl/<model tag>/ and report/rl.json.
"""

import copy
import time

import torch

import common
from common import print0
from data.grade import grade, pass_rates, sample_groups
from data.loader import collate, make_row, math_items, step_indices, token_logprobs
from model import Engine, lora_disabled, merge_lora

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
source = "sft"              # the model to start from (and the frozen reference for kl_coef): a stage (sft, mid,
                            # base), or an open model: hf:<org>/<name> or a folder
model_tag = ""              # default: the source's latest; the rl checkpoints go to the same tag
source_step = -1            # the source's step; -1: its latest
dataset = "tinyworld"       # math problems: tinyworld (built in) or gsm8k (python data/gsm8k.py)
prompt_style = "chat"       # how a problem is put: chat (a user turn) | boxed (plain text asking for a final
                            # \boxed{} answer: for a base model, as reasoning-from-scratch trains Qwen3-0.6B-Base)
# sampling
prompts_per_step = 16       # problems per step, over all ranks (each rank samples its share)
num_samples = 8             # answers sampled per problem: the group its baseline comes from
max_new_tokens = 96         # an answer longer than this is cut (and scores what it says so far)
temperature = 1.0           # sampling temperature, for training and for the pass@k evaluation
top_k = 50                  # sample from the k most likely tokens (0: all)
top_p = 1.0                 # ... and from the fewest whose probability reaches top_p (1: all)
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
# optimisation
num_steps = 60              # optimisation steps (ppo_epochs each)
optimizer = ""              # muon: picochat's AdamW + Muon at lr_scale x its rates | adamw: AdamW at lr on every
                            # weight | "": adamw for an open model (or a checkpoint trained from one), else muon
lr_scale = 0.1              # muon: multiplies the model's default learning rates (nanochat's init_lr_frac: 0.05)
lr = 1e-5                   # adamw: the learning rate (reasoning-from-scratch's GRPO on Qwen3-0.6B: 1e-5)
weight_decay = 0.0
device_batch_size = 32      # sequences per forward/backward (memory only: gradients accumulate over a step)
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
dtype = ""                  # bfloat16|float32; "": bfloat16 on CUDA and AMX CPUs, else float32
zero = 0                    # data parallelism: 0 replicated, 1 optimiser states sharded, 2 + gradients, 3 + weights
seed = 42

# -----------------------------------------------------------------------------
# Advantages and the loss


def group_advantages(rewards, std_norm=False, eps=1e-4):
    """rewards (P, G): G answers to each of P problems -> advantages (P, G). The group mean is the baseline
    (GRPO: no value network); std_norm divides by the group's std as GRPO does, which Dr.GRPO drops because it
    up-weights problems that are nearly always or nearly never solved."""
    adv = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if std_norm:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)  # unbiased std, as GRPO implementations use
    return adv


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


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    config = common.configure(globals())
    common.check_settings(config, positive=("lr_scale", "lr"), non_negative=("weight_decay", "kl_coef", "temperature"))
    rank, world_size, device, dtype, autocast_ctx = common.start_stage(device, dtype, seed)

    # ---- settings that cannot work, refused before any time is spent
    errors = []
    if loss_norm not in ("token", "sequence", "constant"):
        errors.append(f"--loss_norm must be token, sequence or constant, got {loss_norm!r}")
    if num_samples < 2:
        errors.append("--num_samples must be at least 2: the group mean is the baseline")
    if prompts_per_step % world_size:
        errors.append(f"--prompts_per_step={prompts_per_step} must be a multiple of the {world_size} processes")
    if min(prompts_per_step, num_steps, max_new_tokens, ppo_epochs, device_batch_size, eval_samples) < 1:
        errors.append("prompts_per_step, num_steps, max_new_tokens, ppo_epochs, device_batch_size and "
                      "eval_samples must be at least 1")
    if not 0 < top_p <= 1:
        errors.append(f"--top_p must be in (0, 1], got {top_p}")
    if prompt_style not in ("chat", "boxed"):
        errors.append(f"--prompt_style must be chat or boxed, got {prompt_style!r}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        errors.append(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if errors:
        raise SystemExit("error: " + "; ".join(errors))

    # ---- model, tokenizer, the frozen reference; the problems
    model, tokenizer, source_meta = common.load_model(source, device, model_tag, source_step)
    out_tag = model_tag or common.find_model_tag(source)
    ckpt_dir = common.checkpoint_dir("rl", out_tag)
    if max_new_tokens >= model.config.sequence_len:
        raise SystemExit(f"error: --max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"sequence_len={model.config.sequence_len}")
    lora_meta = common.setup_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets, quantize, lora_merge,
                                  {"stage": source, "model_tag": out_tag, "step": source_meta["step"]}, seed)
    # with LoRA the reference is the model itself with its adapters off (lora_disabled): no second copy
    reference = (model if lora_meta else copy.deepcopy(model).eval().requires_grad_(False)) if kl_coef > 0 else None
    engine = Engine(model, tokenizer)
    train_items, test_items = math_items(tokenizer, dataset, model.config.sequence_len - max_new_tokens,
                                         eval_problems, seed, prompt_style)
    my_share = prompts_per_step // world_size

    # ---- data parallelism and optimisers, resume (on any number of ranks: the ranks then sample other problems)
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
                                       top_k=top_k, top_p=top_p, seed=seed, grader=grade, rank=rank,
                                       world_size=world_size, device=device)
            for k, v in last_eval.items():
                log_point(k, v)
            print0(f"step {step:05d} | held-out " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()) +
                   f" | {time.time() - t0:.0f}s")
        if last:
            break
        t0 = time.time()
        lrm = 1.0 - step / num_steps  # linear decay to 0, as nanochat's RL
        common.set_lr(optimizers, lrm)

        # ---- 1. sample a group of answers for each of this rank's problems, and score them
        idx = step_indices(step, prompts_per_step, len(train_items), seed)[rank * my_share:(rank + 1) * my_share]
        problems = [train_items[i] for i in idx]
        model.eval()
        with common.unsharded(model), autocast_ctx:
            groups = sample_groups(engine, [p for p, _ in problems], [a for _, a in problems],
                                   num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=common.derive_seed(seed, "train", step, rank),
                                   grader=grade, format_bonus=format_reward)
        t_sample = time.time() - t0
        rewards = torch.tensor([[sample.reward for sample in group] for group in groups])  # (P, G), on the host
        advantages = group_advantages(rewards, std_norm).tolist()  # (P, G) as lists, read once
        zero_std = [len({sample.reward for sample in group}) == 1 for group in groups]  # (P,)

        # ---- 2. the training rows: the answers of the groups kept, with their advantages; and the step's counts
        rows, row_adv = [], []
        counts = {"answers": 0, "tokens": 0}  # what the loss averages over (groups filtered out do not count)
        for (prompt, _), group, group_adv, flat in zip(problems, groups, advantages, zero_std):
            if filter_zero_std and flat:
                continue  # all answers equal: DAPO leaves them out of the average too
            for sample, adv in zip(group, group_adv):
                row = make_row(prompt, sample.tokens, sample.mask)
                counts["answers"] += 1
                counts["tokens"] += sum(row.trained)
                if adv != 0 or kl_coef > 0:  # a zero advantage has exactly zero policy gradient: skip its pass
                    rows.append(row)
                    row_adv.append(adv)
        samples = [sample for group in groups for sample in group]
        counts.update(rows=len(rows), reward=sum(s.reward for s in samples), correct=sum(s.correct for s in samples),
                      length=sum(len(s.tokens) for s in samples), flat=sum(zero_std))
        counts = common.all_sum(counts, device)  # the whole step's, over all ranks
        batches = [(collate(rows[i:i + device_batch_size], device),
                    common.to_device(torch.tensor(row_adv[i:i + device_batch_size]), device))
                   for i in range(0, len(rows), device_batch_size)]
        # every rank runs as many forward/backward passes as the busiest (from --zero=2 on each is a collective, and
        # the optimisers need every rank's gradients): the others add blank ones, one token that trains nothing
        most = int(common.all_max({"batches": len(batches)}, device)["batches"])
        blank = (collate([make_row([tokenizer.bos_id], [tokenizer.bos_id], [0])], device),
                 torch.zeros(1, device=device))
        batches += [blank] * (most - len(batches))

        # ---- 3. the reference's log-probs (for the KL term), before any update
        ref_logps = []
        if reference is not None:
            with torch.no_grad(), autocast_ctx, lora_disabled(reference):
                ref_logps = [token_logprobs(reference, x, y) for (x, y, _), _ in batches]  # each (B, T)

        # ---- 4. ppo_epochs optimiser steps on these samples
        model.train()
        old_logps, totals = [], {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
        for epoch in range(ppo_epochs if counts["rows"] > 0 else 0):
            # on the device: all_sum below is the optimiser step's one host read
            sums = {name: torch.zeros((), device=device) for name in ("loss", "kl", "clipped")}
            for b, ((x, y, m), adv) in enumerate(batches):
                weights = token_weights(m, loss_norm, counts["answers"], counts["tokens"], max_new_tokens)  # (B, T)
                with autocast_ctx:
                    logp = token_logprobs(model, x, y)  # (B, T)
                if epoch == 0:
                    # the weights have not moved yet, so these are the sampling policy's log-probs: keeping
                    # them saves the separate no-grad pass PPO needs before its first epoch
                    old_logps.append(logp.detach())
                loss, kl = policy_loss(logp, old_logps[b], adv, weights, clip_low, clip_high,
                                       ref_logps[b] if ref_logps else None, kl_coef)
                (loss * world_size).backward()  # the optimisers average over ranks; the weights already divide
                ratio = torch.exp(logp.detach() - old_logps[b])
                clipped = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float() * m  # (B, T)
                sums["loss"] += loss.detach()
                sums["kl"] += kl
                sums["clipped"] += clipped.sum()
            totals = common.all_sum({**sums, "gradient": common.largest_grad(model)}, device)  # the last epoch's
            # before the update: a diverged step never lands
            common.check_finite(step + 1, totals, "--lr or --lr_scale")
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
        step += 1

        # ---- 5. log
        n_answers = prompts_per_step * num_samples
        metrics = {"reward": counts["reward"] / n_answers, "accuracy": counts["correct"] / n_answers,
                   "response_len": counts["length"] / n_answers, "zero_std": counts["flat"] / prompts_per_step,
                   "loss": totals["loss"]}
        if kl_coef > 0:
            metrics["kl"] = totals["kl"]
        if ppo_epochs > 1:
            metrics["clipped"] = totals["clipped"] / max(counts["tokens"], 1)
        for k, v in metrics.items():
            log_point(k, v)
        train_time += time.time() - t0
        print0(f"step {step:05d}/{num_steps:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
               + f" | lr x{lrm:.3f} | sample {t_sample:.1f}s, train {time.time() - t0 - t_sample:.1f}s")
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
    common.finish_stage("rl", {"stage": "rl", "algo": "grpo", "config": config, "metrics": metrics,
                               "history": history, "checkpoint": ckpt_dir}, rank)
