"""
Reinforcement learning with verifiable rewards on math word problems: the GRPO family, and PPO. The policy samples a
group of answers per problem with the KV-cache engine (calculator included), the verifier (data/grade.py) scores them
1/0, and each answer is pushed up or down by how much better it did than its group. (DPO on preference pairs: dpo.py.)

    python rl.py                                    # the latest sft model on the built-in problems (CPU-sized)
    python rl.py --dataset=gsm8k --max_new_tokens=256 --num_steps=300   # GSM8K (after python data/gsm8k.py)
    python rl.py --loss_norm=sequence --std_norm=1 --kl_coef=0.04       # GRPO as published (DeepSeekMath)
    python rl.py --loss_norm=constant               # Dr.GRPO: no length bias, no std division
    python rl.py --ppo_epochs=2 --clip_low=0.2 --clip_high=0.28 --filter_zero_std=1   # DAPO-style
    python rl.py --algo=ppo --ppo_epochs=2          # PPO with a learned critic (InstructGPT's recipe, below)
    torchrun --nproc_per_node=8 rl.py --dataset=gsm8k   # each rank samples its share of every step's prompts
    torchrun --nproc_per_node=8 rl.py --zero=3      # optimiser states, gradients and weights sharded (see common.py)
    python rl.py --source=hf:Qwen/Qwen3-0.6B-Base --dataset=gsm8k   # an open model: AdamW at 1e-5 (README.md)
    python rl.py --resume=1                         # continue the latest rl checkpoint of this model tag
    python rl.py --lora_rank=16 --kl_coef=0.04      # LoRA; the KL reference is the base, adapters off
    python rl.py --ptx_coef=0.5                     # keep the chat model: the SFT loss on SFT chats at every step

Defaults are nanochat's simple on-policy variant of GRPO: no reference model or KL, one gradient step per batch
(so no ratio clipping), advantage = reward - group mean without std division, DAPO's token-level normalisation.
RL needs an sft model that already solves some problems: groups whose answers are all wrong teach nothing (what
it learns on the built-in problems: README.md, tests/bench_rl.py).

--algo=ppo is PPO as InstructGPT ran it (its own section below): a critic, the sft model with a one-number head,
predicts each token's expected return; GAE turns its values and per-token rewards (the verifier's score on the last
token, minus kl_penalty * log(pi/ref) on every token) into per-token advantages; each batch of answers is reused for
ppo_epochs passes of num_minibatches clipped steps, with a clipped value loss and an entropy bonus. GRPO needs no
critic (the group's mean reward is the baseline) but several answers to every problem, and credits every token of an
answer alike. PPO can learn from one answer per problem and credits tokens one by one, for a second model to train
and more settings to tune; pick it when groups are too dear (long answers, large models) or rewards differ within
an answer, GRPO for verifiable 0/1 rewards on problems the model sometimes solves.

Reads $PICOCHAT_DIR/checkpoints/<source>/, writes $PICOCHAT_DIR/checkpoints/rl/<model tag>/ and report/rl.json.
"""

import copy
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

import common
from common import print0
from data import load_conversations
from data.grade import grade, pass_rates, sample_groups
from data.loader import collate, make_row, math_items, step_indices, token_logprobs
from model import Engine, lora_disabled, merge_lora

# -----------------------------------------------------------------------------
# Settings (override with --key=value)
algo = "grpo"               # grpo: the group's mean reward is the baseline | ppo: a learned critic (PPO section)
source = "sft"              # the model to start from (and the frozen reference for kl_coef): a stage (sft, mid,
                            # base), or an open model: hf:<org>/<name> or a folder
model_tag = ""              # default: the source's latest; the rl checkpoints go to the same tag
source_step = -1            # the source's step; -1: its latest
dataset = "tinyworld"       # math problems: tinyworld (built in) or gsm8k (python data/gsm8k.py)
prompt_style = "chat"       # how a problem is put: chat (a user turn) | boxed (plain text asking for a final
                            # \boxed{} answer: for a base model, as reasoning-from-scratch trains Qwen3-0.6B-Base)
# sampling
prompts_per_step = 16       # problems per step, over all ranks (each rank samples its share)
num_samples = 8             # answers sampled per problem: the group GRPO's baseline comes from
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
kl_coef = 0.0               # GRPO: weight of the k3 KL estimate against the frozen source model (0: no reference)
# keeping the chat model (GRPO): rewards on math alone teach the model to answer everything with a solution, and a
# KL on math answers does not stop that (it constrains only the math prompts)
ptx_coef = 0.0              # weight of the SFT loss on ptx_rows conversations of the SFT mixture, added to every
                            # optimiser step (InstructGPT's PPO-ptx, with SFT chats where it mixed pretraining text)
ptx_rows = 16               # those conversations per step, over all ranks
# PPO (--algo=ppo): a critic, per-token advantages, minibatches; ppo_epochs, clip_low/high and loss_norm apply too
gamma = 1.0                 # discount per token: 1 values a right answer the same however long it is
gae_lambda = 0.95           # GAE: 1 is the plain return (unbiased, noisy), 0 trusts the critic's next value
kl_penalty = 0.02           # each token's reward loses kl_penalty * log(pi/ref), ref the frozen source (InstructGPT)
value_clip = 0.2            # the critic's value may move this far from its sampling-time one before its loss stops
ent_coef = 0.001            # weight of the policy's mean entropy, a bonus that keeps it exploring
num_minibatches = 4         # optimiser steps per pass over the step's answers (each rank takes a share of each)
critic_lr_scale = 0.1       # lr_scale of the critic's optimisers
# optimisation
num_steps = 60              # steps: each samples, then makes ppo_epochs optimiser steps (PPO: x num_minibatches)
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
compile_generate = False    # decode through a torch.compile'd step (model.generate's compile): compiling takes
                            # tens of seconds on a CPU, paid back by long generations (tests/bench_generate.py)
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
    weights: (B, T); advantages: (B,) one per answer (GRPO) or (B, T) one per token (PPO). Returns (loss, kl), kl the
    weighted mean k3 estimate (0 without a ref).
    On the first epoch old_logp == logp (detached): the ratio is 1 and its gradient is that of logp, so this is
    REINFORCE with the group baseline; later epochs reuse the samples, and the clip stops a token's gradient
    once its probability has moved more than the clip range in the direction its advantage pushes."""
    ratio = torch.exp(logp - old_logp)  # (B, T)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
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
# PPO (--algo=ppo): a critic instead of the group baseline. What a step does, in order: the rollout-time log-probs
# of the policy and the reference and the critic's values (no grad); per-token rewards; GAE; then ppo_epochs passes
# over the answers in num_minibatches clipped steps of the policy and the critic.


def make_critic(model):
    """The critic: a copy of the sft model whose vocabulary head is swapped for one output, so critic(x) is a value
    per position, (B, T, 1) (GPT's softcap bounds it to +-softcap, far beyond the rewards). InstructGPT started its
    critic from the reward model; without one, the sft model's features are the best start. The head starts at 0:
    every value is 0 until the critic has learned, and the first advantages are the returns themselves."""
    critic = copy.deepcopy(model)
    critic.lm_head = torch.nn.Linear(model.config.n_embd, 1, bias=False, device=model.lm_head.weight.device)
    torch.nn.init.zeros_(critic.lm_head.weight)
    return critic


def ppo_rewards(scores, mask, logp, ref_logp, kl_penalty):
    """Per-token rewards (B, T): -kl_penalty * (log pi - log ref) on every trained token (InstructGPT's KL penalty:
    this k1 estimate averages to KL(pi||ref) over sampled tokens) and the verifier's score (B,) added on each
    answer's last trained token. mask, logp, ref_logp: (B, T)."""
    B, T = mask.shape
    rewards = -kl_penalty * (logp - ref_logp) * mask  # (B, T)
    last = (mask * torch.arange(T, device=mask.device)).argmax(dim=1)  # (B,) the last position with mask 1
    rewards[torch.arange(B, device=mask.device), last] += scores
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) along each answer. rewards, values, mask: (B, T).
    The steps are the positions with mask 1, the tokens the policy chose; the prompt, forced calculator outputs and
    padding are skipped, so a calculator result between two tokens is not a step of the discount. After an answer's
    last token the return is 0 (it has ended). Returns (advantages, returns), (B, T), 0 where the mask is 0:
        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,   return_t = A_t + V_t"""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros(B, device=rewards.device)  # (B,) the value of the next step of each row
    next_adv = torch.zeros(B, device=rewards.device)  # (B,)
    for t in reversed(range(T)):
        step = mask[:, t] > 0  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(step, adv, 0.0)
        next_value = torch.where(step, values[:, t], next_value)
        next_adv = torch.where(step, adv, next_adv)
    return advantages, (advantages + values) * mask


def logprobs_and_entropy(model, x, y):
    """log p(target) and the entropy of the policy's next-token distribution per position, each (B, T) float32;
    log p is 0 where the target is -1. Unlike token_logprobs, this holds the (B, T, V) log-probs: lower
    device_batch_size for a large vocabulary."""
    logprobs = F.log_softmax(model(x), dim=-1)  # (B, T, V), from float32 logits
    logp = logprobs.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y >= 0)  # (B, T)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)  # (B, T)
    return logp, entropy


def ppo_loss(logp, entropy, old_logp, advantages, weights, clip_low, clip_high, ent_coef):
    """The policy's loss: the clipped surrogate of policy_loss, per-token advantages (B, T), minus ent_coef times
    the weighted entropy. With the same advantage on every token of an answer it is GRPO's loss."""
    surrogate, _ = policy_loss(logp, old_logp, advantages, weights, clip_low, clip_high)
    return surrogate - ent_coef * (entropy * weights).sum()


def value_loss(values, old_values, returns, weights, clip):
    """PPO's clipped value loss, summed with the per-token weights; all (B, T). The worse of the plain squared error
    and that of the value clipped to within `clip` of its sampling-time one: like the policy's ratio clip, this
    stops the critic from moving far on one batch."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)  # (B, T)
    per_token = 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)  # (B, T)
    return (per_token * weights).sum()


def ppo_update(model, critic, reference, optimizers, critic_optimizers, problems, groups, step, rank, world_size,
               device, autocast_ctx):
    """PPO's half of a training step, on this rank's answers (groups: per problem a list of Samples): returns the
    step's metrics over all ranks."""
    rows = [make_row(prompt, sample.tokens, sample.mask) for (prompt, _), group in zip(problems, groups)
            for sample in group]
    scores = [sample.reward for group in groups for sample in group]

    # ---- the rollout as it was sampled (no grad): per row, its log-probs, the reference's, values, advantages
    old_logp, old_values, advantages, returns = [], [], [], []
    kl_sum = torch.zeros((), device=device)  # on the device: the moments' all_sum below reads it with the rest
    for i in range(0, len(rows), device_batch_size):
        x, y, m = collate(rows[i:i + device_batch_size], device)
        with torch.no_grad(), autocast_ctx:
            logp, _ = logprobs_and_entropy(model, x, y)  # (B, T)
            ref_logp = logp  # (B, T)
            if reference is not None:
                with lora_disabled(reference):  # with LoRA the reference is the policy, adapters off
                    ref_logp = token_logprobs(reference, x, y)  # (B, T)
            values = critic(x)[..., 0].float() * m  # (B, T)
        rewards = ppo_rewards(common.to_device(torch.tensor(scores[i:i + device_batch_size]), device), m, logp,
                              ref_logp, kl_penalty)
        adv, ret = gae(rewards, values, m, gamma, gae_lambda)  # (B, T) each
        kl_sum += ((logp - ref_logp) * m).sum()
        for b, row in enumerate(rows[i:i + device_batch_size]):
            n = len(row.inputs)
            old_logp.append(logp[b, :n])
            old_values.append(values[b, :n])
            advantages.append(adv[b, :n])
            returns.append(ret[b, :n])
    # whiten the advantages over the whole step's tokens (all ranks), as PPO implementations do: a zero-mean signal
    # pushes the worse half of the tokens down even while the critic still knows little
    trained = sum(sum(row.trained) for row in rows)
    moments = common.all_sum({"tokens": trained, "sum": sum(a.sum() for a in advantages),
                              "sumsq": sum((a ** 2).sum() for a in advantages), "kl": kl_sum}, device)
    mean = moments["sum"] / moments["tokens"]
    std = max(moments["sumsq"] / moments["tokens"] - mean ** 2, 0.0) ** 0.5
    advantages = [(a - mean) / (std + 1e-8) * common.to_device(torch.tensor(row.trained), device)
                  for a, row in zip(advantages, rows)]

    # ---- ppo_epochs passes over the answers, each in num_minibatches optimiser steps of the policy and the critic
    model.train()
    critic.train()
    generator = torch.Generator().manual_seed(common.derive_seed(seed, "minibatches", step, rank))
    sums = {"loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clipped": 0.0, "tokens": 0.0}
    for epoch in range(ppo_epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for k in range(num_minibatches):
            minibatch = order[k::num_minibatches]  # the same size on every rank: they step together
            count = common.all_sum({"answers": len(minibatch),
                                    "tokens": sum(sum(rows[j].trained) for j in minibatch)}, device)
            # on the device: the all_sum before the optimiser step is its one host read
            step_sums = {name: torch.zeros((), device=device) for name in sums}
            for i in range(0, len(minibatch), device_batch_size):
                idx = minibatch[i:i + device_batch_size]
                x, y, m = collate([rows[j] for j in idx], device)
                old, adv, old_v, ret = (pad_sequence([per_row[j] for j in idx], batch_first=True)
                                        for per_row in (old_logp, advantages, old_values, returns))  # (B, T) each
                weights = token_weights(m, loss_norm, count["answers"], count["tokens"], max_new_tokens)  # (B, T)
                with autocast_ctx:
                    logp, entropy = logprobs_and_entropy(model, x, y)  # (B, T)
                    values = critic(x)[..., 0].float()  # (B, T)
                loss = ppo_loss(logp, entropy, old, adv, weights, clip_low, clip_high, ent_coef)
                v_loss = value_loss(values, old_v, ret, weights, value_clip)
                (loss * world_size).backward()  # the optimisers average over ranks; the weights already divide
                (v_loss * world_size).backward()  # into the critic alone: the two models share no weights
                ratio = torch.exp(logp.detach() - old)
                step_sums["clipped"] += (((ratio < 1 - clip_low) | (ratio > 1 + clip_high)).float() * m).sum()
                step_sums["entropy"] += (entropy.detach() * m).sum()
                step_sums["tokens"] += m.sum()
                step_sums["loss"] += loss.detach() / num_minibatches
                step_sums["value_loss"] += v_loss.detach() / num_minibatches
            # over all ranks, checked before the update: a diverged step never lands
            step_totals = common.all_sum({**step_sums, "gradient": common.largest_grad(model),
                                          "critic_gradient": common.largest_grad(critic)}, device)
            common.check_finite(step + 1, step_totals, "--lr or --lr_scale, --critic_lr_scale")
            for opt in optimizers + critic_optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            critic.zero_grad(set_to_none=True)
            if epoch == ppo_epochs - 1:  # the metrics are the last pass's
                sums = {name: sums[name] + step_totals[name] for name in sums}
    metrics = {"loss": sums["loss"], "value_loss": sums["value_loss"],
               "entropy": sums["entropy"] / sums["tokens"], "clipped": sums["clipped"] / sums["tokens"]}
    if reference is not None:
        metrics["kl"] = moments["kl"] / moments["tokens"]
    return metrics


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    config = common.configure(globals())
    common.check_settings(config, positive=("lr_scale", "lr"), non_negative=("weight_decay", "kl_coef", "temperature"))
    rank, world_size, device, dtype, autocast_ctx = common.start_stage(device, dtype, seed)

    # ---- settings that cannot work, refused before any time is spent
    errors = []
    if algo not in ("grpo", "ppo"):
        errors.append(f"--algo must be grpo or ppo, got {algo!r}")
    if loss_norm not in ("token", "sequence", "constant"):
        errors.append(f"--loss_norm must be token, sequence or constant, got {loss_norm!r}")
    if algo == "grpo" and num_samples < 2:
        errors.append("--num_samples must be at least 2: the group mean is the baseline")
    if algo == "ppo" and (std_norm or filter_zero_std or kl_coef or ptx_coef):
        errors.append("--std_norm, --filter_zero_std, --kl_coef and --ptx_coef are GRPO's (PPO's KL is "
                      "--kl_penalty)")
    if ptx_coef and (ptx_rows < 1 or ptx_rows % world_size):
        errors.append(f"--ptx_rows={ptx_rows} must be a positive multiple of the {world_size} processes")
    if algo == "ppo" and (zero >= 2 or lora_rank):
        errors.append("--algo=ppo runs at --zero 0 or 1 and without --lora_rank (its critic is a second whole "
                      "model, not sharded or adapted yet)")
    if algo == "ppo" and not (0 <= gamma <= 1 and 0 <= gae_lambda <= 1 and value_clip > 0 and
                              1 <= num_minibatches <= prompts_per_step // world_size * num_samples):
        errors.append("PPO needs gamma and gae_lambda in [0, 1], value_clip > 0 and 1 <= num_minibatches <= the "
                      "answers of each rank (prompts_per_step / processes * num_samples)")
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
    use_reference = kl_coef > 0 if algo == "grpo" else kl_penalty > 0
    # with LoRA the reference is the model itself with its adapters off (lora_disabled): no second copy
    reference = (model if lora_meta else copy.deepcopy(model).eval().requires_grad_(False)) if use_reference else None
    critic = make_critic(model) if algo == "ppo" else None
    engine = Engine(model, tokenizer, compile_generate)
    train_items, test_items = math_items(tokenizer, dataset, model.config.sequence_len - max_new_tokens,
                                         eval_problems, seed, prompt_style)
    my_share = prompts_per_step // world_size
    ptx_convs = load_conversations("train") if ptx_coef > 0 else []

    def ptx_batches(step):
        """This rank's share of the step's SFT conversations as batches of rows that train the assistant's tokens,
        and the step's trained tokens over all ranks. A conversation with nothing trainable within the model's
        context becomes a blank row, so every rank makes as many passes."""
        share = ptx_rows // world_size
        idx = step_indices(step, ptx_rows, len(ptx_convs), seed)[rank * share:(rank + 1) * share]
        rows = []
        for i in idx:
            try:
                ids, mask = tokenizer.render_conversation(ptx_convs[i], max_len=model.config.sequence_len)
                rows.append(make_row(ids[:1], ids[1:], mask[1:]))
            except ValueError:
                rows.append(make_row([tokenizer.bos_id], [tokenizer.bos_id], [0]))
        tokens = common.all_sum({"tokens": sum(sum(r.trained) for r in rows)}, device)["tokens"]
        return [collate(rows[i:i + device_batch_size], device) for i in range(0, len(rows), device_batch_size)], tokens

    # ---- data parallelism and optimisers, resume (on any number of ranks: the ranks then sample other problems).
    # PPO's critic is saved with the ranks' own state: the model file stays the policy alone, which evaluate.py and
    # chat.py load as any rl model
    open_model = source_meta.get("open_model")
    optimizers = common.stage_optimizers(model, zero, optimizer, lr, lr_scale, weight_decay, open_model)
    critic_optimizers = common.stage_optimizers(critic, zero, optimizer, lr * critic_lr_scale / lr_scale,
                                                critic_lr_scale, weight_decay, open_model) if critic else []
    step, history, rank_states = common.resume_stage(resume, ckpt_dir, model, optimizers, rank, device, {
        "prompts_per_step": prompts_per_step, "optimizer": optimizer, "algo": algo}, history={})
    if critic is not None and rank_states:
        critic.load_state_dict(rank_states[0]["critic"])
        for opt, opt_state in zip(critic_optimizers, rank_states[0]["critic_optimizers"], strict=True):
            opt.load_state_dict(opt_state)

    def log_point(name, value):
        history.setdefault(name, []).append((step, value))

    def save(step, metrics):
        common.save_stage(ckpt_dir, step, model, optimizers, rank, {
            "config": config, "metrics": metrics, "history": history, "tokenizer_hash": tokenizer.hash,
            "source": {"stage": source, "model_tag": out_tag, "step": source_meta["step"]},
            "open_model": source_meta.get("open_model"), **lora_meta},
            rank_state=None if critic is None else {  # every rank gathers the optimisers' whole states
                "critic": critic.state_dict(), "critic_optimizers": [o.full_state_dict() for o in critic_optimizers]})

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
        common.set_lr(optimizers + critic_optimizers, lrm)

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
        zero_std = [len({sample.reward for sample in group}) == 1 for group in groups]  # (P,)
        samples = [sample for group in groups for sample in group]
        rollout = common.all_sum({"reward": sum(s.reward for s in samples),
                                  "correct": sum(s.correct for s in samples),
                                  "length": sum(len(s.tokens) for s in samples), "flat": sum(zero_std)},
                                 device)  # the whole step's, over all ranks

        if algo == "ppo":
            # ---- 2-4. PPO: per-token advantages from the critic, then passes in minibatches (the PPO section)
            update = ppo_update(model, critic, reference, optimizers, critic_optimizers, problems, groups, step,
                                rank, world_size, device, autocast_ctx)
        else:
            rewards = torch.tensor([[sample.reward for sample in group] for group in groups])  # (P, G), on the host
            advantages = group_advantages(rewards, std_norm).tolist()  # (P, G) as lists, read once
            # ---- 2. the training rows: the answers of the groups kept, with their advantages; the step's counts
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
            counts["rows"] = len(rows)
            counts = common.all_sum(counts, device)  # the whole step's, over all ranks
            batches = [(collate(rows[i:i + device_batch_size], device),
                        common.to_device(torch.tensor(row_adv[i:i + device_batch_size]), device))
                       for i in range(0, len(rows), device_batch_size)]
            # every rank runs as many forward/backward passes as the busiest (from --zero=2 on each is a collective,
            # and the optimisers need every rank's gradients): the others add blank ones, one token that trains nothing
            most = int(common.all_max({"batches": len(batches)}, device)["batches"])
            blank = (collate([make_row([tokenizer.bos_id], [tokenizer.bos_id], [0])], device),
                     torch.zeros(1, device=device))
            batches += [blank] * (most - len(batches))

            # ---- 3. the reference's log-probs (for the KL term), before any update
            ref_logps = []
            if reference is not None:
                with torch.no_grad(), autocast_ctx, lora_disabled(reference):
                    ref_logps = [token_logprobs(reference, x, y) for (x, y, _), _ in batches]  # each (B, T)

            # ---- 4. ppo_epochs optimiser steps on these samples (each with the SFT loss of the ptx batch)
            ptx, ptx_tokens = ptx_batches(step) if ptx_coef > 0 else ([], 0)
            model.train()
            old_logps, totals = [], {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "ptx": 0.0}
            for epoch in range(ppo_epochs if counts["rows"] > 0 or ptx else 0):
                # on the device: all_sum below is the optimiser step's one host read
                sums = {name: torch.zeros((), device=device) for name in ("loss", "kl", "clipped", "ptx")}
                for b, ((x, y, m), adv) in enumerate(batches):
                    weights = token_weights(m, loss_norm, counts["answers"], counts["tokens"],
                                            max_new_tokens)  # (B, T)
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
                for x, y, m in ptx:
                    with autocast_ctx:
                        nll = -(token_logprobs(model, x, y) * m).sum() / max(ptx_tokens, 1)  # this rank's share
                    (ptx_coef * nll * world_size).backward()
                    sums["ptx"] += nll.detach()
                # the last epoch's totals; checked before the update: a diverged step never lands
                totals = common.all_sum({**sums, "gradient": common.largest_grad(model)}, device)
                common.check_finite(step + 1, totals, "--lr or --lr_scale")
                for opt in optimizers:
                    opt.step()
                model.zero_grad(set_to_none=True)
            update = {"loss": totals["loss"]}
            if kl_coef > 0:
                update["kl"] = totals["kl"]
            if ptx_coef > 0:
                update["ptx"] = totals["ptx"]
            if ppo_epochs > 1:
                update["clipped"] = totals["clipped"] / max(counts["tokens"], 1)
        step += 1

        # ---- 5. log
        n_answers = prompts_per_step * num_samples
        metrics = {"reward": rollout["reward"] / n_answers, "accuracy": rollout["correct"] / n_answers,
                   "response_len": rollout["length"] / n_answers, "zero_std": rollout["flat"] / prompts_per_step,
                   **update}
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
    common.finish_stage("rl", {"stage": "rl", "algo": algo, "config": config, "metrics": metrics,
                               "history": history, "checkpoint": ckpt_dir}, rank)
