"""rl.py: advantages, the three loss normalisations, PPO clipping and the k3 KL on hand-computed numbers, PPO's
per-token rewards, GAE, value loss and entropy likewise, training masks (prompt and calculator outputs excluded), and
short end-to-end runs of `rl.py` (GRPO and PPO, with resume) on a tiny random GPT with a tokenizer trained in the
test: after a GRPO step, every sampled answer's log-probability has moved the way its advantage says. (DPO:
test_dpo.py, distillation: test_distill.py, which share the fixtures here.)"""
import json
import math
import os
import runpy
import sys

import pytest
import torch

import common
import data.grade
import rl
from data import load_conversations
from data.loader import Row, collate, make_row, step_indices, token_logprobs
from model import GPT, GPTConfig
from tokenizer import load_tokenizer

from conftest import save_random_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# Advantages


def test_advantages_are_reward_minus_group_mean():
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    # means 0.25, 1, 0.5
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25], [0, 0, 0, 0], [0.5, 0.5, -0.5, -0.5]])
    assert torch.allclose(rl.group_advantages(rewards), expected)


def test_std_norm_divides_by_the_groups_unbiased_std():
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    # std of [1,0,0,0]: sqrt((0.75^2 + 3 * 0.25^2) / 3) = sqrt(0.25) = 0.5
    # std of [1,1,0,0]: sqrt(4 * 0.5^2 / 3) = 0.57735; a flat group stays 0 (0 / eps)
    adv = rl.group_advantages(rewards, std_norm=True, eps=1e-4)
    assert torch.allclose(adv[0], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))
    assert torch.allclose(adv[2], torch.tensor([0.8660, 0.8660, -0.8660, -0.8660]), atol=1e-3)


# -----------------------------------------------------------------------------
# The policy loss: two answers, advantages +1 and -0.5; the first has 3 trained tokens, the second 1
# (its other positions are prompt or padding). On the first epoch the ratio is 1, so loss = -sum(w * A).

MASK = torch.tensor([[1.0, 1, 1], [0, 1, 0]])
ADV = torch.tensor([1.0, -0.5])


def first_epoch_loss(loss_norm):
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    w = rl.token_weights(MASK, loss_norm, num_seqs=2, num_tokens=4, max_new_tokens=4)
    loss, _ = rl.policy_loss(logp, logp.detach(), ADV, w, 0.2, 0.28)
    loss.backward()
    return loss.item(), logp.grad


def test_token_level_normalisation_DAPO():
    # every trained token weighs 1/4: loss = -(3 * 1 + 1 * -0.5) / 4 = -0.625
    loss, grad = first_epoch_loss("token")
    assert loss == pytest.approx(-0.625)
    assert torch.allclose(grad, torch.tensor([[-0.25, -0.25, -0.25], [0, 0.125, 0]]))


def test_sequence_level_normalisation_GRPO():
    # answer means, then the mean of 2: weights 1/(3*2) and 1/(1*2); loss = -(3/6 * 1 + 1/2 * -0.5) = -0.25
    loss, grad = first_epoch_loss("sequence")
    assert loss == pytest.approx(-0.25)
    assert torch.allclose(grad, torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0, 0.25, 0]]))


def test_constant_normalisation_DrGRPO():
    # one divisor: 2 answers * max_new_tokens 4 = 8; loss = -(3 - 0.5) / 8 = -0.3125
    loss, grad = first_epoch_loss("constant")
    assert loss == pytest.approx(-0.3125)
    assert torch.allclose(grad, torch.tensor([[-0.125, -0.125, -0.125], [0, 0.0625, 0]]))


def test_unknown_loss_norm_is_refused():
    with pytest.raises(ValueError, match="loss_norm"):
        rl.token_weights(MASK, "tokens", 2, 4, 4)


def test_ppo_clip_stops_the_gradient_only_past_the_range_in_the_advantages_direction():
    # ratios 1.5 and 0.5 against advantages +1 and -1, clip range [0.8, 1.28]
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    w = torch.ones(4, 1)
    loss, _ = rl.policy_loss(logp, old, adv, w, clip_low=0.2, clip_high=0.28)
    loss.backward()
    # per row: -min(r A, clip(r) A) = -1.28 (clipped), 1.5, -0.5, 0.8 (clipped)
    assert loss.item() == pytest.approx(-1.28 + 1.5 - 0.5 + 0.8)
    # d(-r A)/dlogp = -r A where not clipped, 0 where clipped
    assert torch.allclose(logp.grad, torch.tensor([[0.0], [1.5], [-0.5], [0.0]]))


def test_k3_kl_estimate():
    # delta = ref - logp: log 2 -> exp(d) - d - 1 = 2 - 0.693147 - 1 = 0.306853; delta 0 -> 0
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0 + math.log(2), -2.0]])
    w = torch.tensor([[0.5, 0.5]])
    loss, kl = rl.policy_loss(logp, logp, torch.zeros(1), w, 0.2, 0.2, ref_logp=ref, kl_coef=0.1)
    assert kl.item() == pytest.approx(0.5 * 0.306853, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * 0.5 * 0.306853, abs=1e-6)


# -----------------------------------------------------------------------------
# PPO's pieces


def test_ppo_rewards_put_the_kl_on_every_trained_token_and_the_score_on_the_last():
    # row 0: prompt, 2 tokens, a forced calculator output, 1 token, padding; row 1: prompt, 3 tokens, padding
    mask = torch.tensor([[0.0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]])
    logp = torch.tensor([[0.0, -1.0, -2.0, -4.0, -0.5, 0], [0, -1.0, -1.0, -1.0, 0, 0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, -1.0, -0.5, 0], [0, -1.0, -2.0, -1.0, 0, 0]])
    rewards = rl.ppo_rewards(torch.tensor([1.0, 0.0]), mask, logp, ref, kl_penalty=0.1)
    # -0.1 * (logp - ref): row 0: -0.1 * 0.5, -0.1 * -1, (forced: none), 0 + the score 1; row 1: 0, -0.1 * 1, 0 + 0
    assert torch.allclose(rewards, torch.tensor([[0, -0.05, 0.1, 0, 1.0, 0], [0, 0, -0.1, 0, 0, 0]]))


def test_gae_on_a_four_step_answer_skips_the_forced_calculator_output():
    # steps at positions 1, 2, 4, 5 (0: prompt, 3: a forced output, whose reward and value must not count)
    mask = torch.tensor([[0.0, 1, 1, 0, 1, 1]])
    rewards = torch.tensor([[7.0, 0.1, -0.2, 5.0, 0.0, 1.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 9.0, 0.6, 0.8]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # backwards, gamma * lam = 0.45; after the last step the value is 0:
    #   pos 5: delta = 1 + 0 - 0.8 = 0.2                      A = 0.2
    #   pos 4: delta = 0 + 0.9 * 0.8 - 0.6 = 0.12             A = 0.12 + 0.45 * 0.2 = 0.21
    #   pos 2: delta = -0.2 + 0.9 * 0.6 - 0.4 = -0.06         A = -0.06 + 0.45 * 0.21 = 0.0345
    #   pos 1: delta = 0.1 + 0.9 * 0.4 - 0.5 = -0.04          A = -0.04 + 0.45 * 0.0345 = -0.024475
    assert torch.allclose(adv, torch.tensor([[0, -0.024475, 0.0345, 0, 0.21, 0.2]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0, 0.475525, 0.4345, 0, 0.81, 1.0]]), atol=1e-6)  # A + V
    # lam = 1: the returns are the discounted sums of the rewards, whatever the values
    #   pos 5: 1; pos 4: 0 + 0.9 * 1 = 0.9; pos 2: -0.2 + 0.9 * 0.9 = 0.61; pos 1: 0.1 + 0.9 * 0.61 = 0.649
    _, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[0, 0.649, 0.61, 0, 0.9, 1.0]]), atol=1e-6)


def test_clipped_value_loss():
    # old values 0.5, clip 0.2: a value may move to 0.3 .. 0.7 before its loss stops pulling it
    values = torch.tensor([[1.0, 0.5, 0.0, 1.0]], requires_grad=True)
    old = torch.full((1, 4), 0.5)
    returns = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    loss = rl.value_loss(values, old, returns, torch.ones(1, 4), clip=0.2)
    loss.backward()
    # 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped = 0.7, 0.5, 0.3, 0.7:
    #   max(1, 1.69) = 1.69 (the clipped one: no gradient)    max(0.25, 0.25): gradient v - R = 0.5
    #   max(0, 0.09) = 0.09 (clipped: no gradient)            max(1, 0.49) = 1 (unclipped): gradient v - R = 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.25 + 0.09 + 1.0))
    assert torch.allclose(values.grad, torch.tensor([[0.0, 0.5, 0.0, 1.0]]))


def test_ppo_policy_loss_equals_grpos_when_every_token_has_its_answers_advantage():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.9], [0.5, 1.1, 1.0]])).requires_grad_(True)
    w = rl.token_weights(MASK, "token", num_seqs=2, num_tokens=4, max_new_tokens=4)
    grpo, _ = rl.policy_loss(logp, old, ADV, w, 0.2, 0.28)
    (grpo_grad,) = torch.autograd.grad(grpo, logp)
    ppo = rl.ppo_loss(logp, torch.zeros(2, 3), old, ADV[:, None].expand(2, 3), w, 0.2, 0.28, ent_coef=0.0)
    (ppo_grad,) = torch.autograd.grad(ppo, logp)
    # answer 1 (A = 1): ratios 1.5 -> clipped to 1.28, 1.0, 0.9; answer 2 (A = -0.5): its one token, ratio 1.1
    assert ppo.item() == pytest.approx(grpo.item()) and grpo.item() == pytest.approx(-(1.28 + 1.0 + 0.9 - 0.55) / 4)
    assert torch.allclose(ppo_grad, grpo_grad)
    # the entropy bonus: minus ent_coef times the weighted entropy, 0.1 * (1 + 2 + 3 + 5) / 4
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    ppo = rl.ppo_loss(logp, entropy, old, ADV[:, None].expand(2, 3), w, 0.2, 0.28, ent_coef=0.1)
    assert ppo.item() == pytest.approx(grpo.item() - 0.1 * 11 / 4)


def test_logprobs_and_entropy_agree_with_token_logprobs_and_a_uniform_policy():
    from model import GPT, config_from_depth
    torch.manual_seed(0)
    model = GPT(config_from_depth(1, 64, 16, aspect_ratio=32, head_dim=16))
    model.init_weights()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # a head that prefers some tokens
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    y[1, :3] = -1
    logp, entropy = rl.logprobs_and_entropy(model, x, y)
    assert torch.allclose(logp, token_logprobs(model, x, y), atol=1e-5) and (logp[1, :3] == 0).all()
    assert (entropy > 0).all() and (entropy < math.log(64)).all()
    torch.nn.init.zeros_(model.lm_head.weight)  # every token equally likely: log p = -log V, entropy log V
    logp, entropy = rl.logprobs_and_entropy(model, x, y)
    assert torch.allclose(logp[0], torch.full((8,), -math.log(64))) and torch.allclose(entropy, torch.full((2, 8),
                                                                                                          math.log(64)))


def test_the_critic_is_the_model_with_a_zero_one_number_head():
    from model import GPT, config_from_depth
    model = GPT(config_from_depth(1, 64, 16, aspect_ratio=32, head_dim=16))
    model.init_weights()
    critic = rl.make_critic(model)
    values = critic(torch.randint(0, 64, (2, 5)))
    assert values.shape == (2, 5, 1) and (values == 0).all()
    assert model.lm_head.weight.shape == (64, model.config.n_embd)  # the policy keeps its head
    assert torch.equal(critic.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    assert critic.transformer.h[0].mlp.c_fc.weight is not model.transformer.h[0].mlp.c_fc.weight


# -----------------------------------------------------------------------------
# Rows and masks


def test_rows_train_only_on_the_tokens_the_policy_chose():
    # prompt 1 2 3; the answer 10 [11 12 forced calculator output] 13 14
    x, y, m = make_row([1, 2, 3], [10, 11, 12, 13, 14], [1, 0, 0, 1, 1])
    assert x == [1, 2, 3, 10, 11, 12, 13]
    assert y == [2, 3, 10, 11, 12, 13, 14]
    assert m == [0, 0, 1, 0, 0, 1, 1]
    xb, yb, mb = collate([(x, y, m), ([5, 6], [6, 7], [0, 1])], "cpu")
    assert xb.tolist() == [x, [5, 6, 0, 0, 0, 0, 0]]
    assert yb.tolist() == [[-1, -1, 10, -1, -1, 13, 14], [-1, 7, -1, -1, -1, -1, -1]]
    assert mb.tolist() == [m, [0, 1, 0, 0, 0, 0, 0]]


def test_step_indices_cover_the_data_then_reshuffle():
    first = step_indices(0, 4, 10, seed=1) + step_indices(1, 4, 10, seed=1)
    epoch0 = step_indices(0, 10, 10, seed=1)
    assert first == epoch0[:8] and sorted(epoch0) == list(range(10))
    assert step_indices(1, 10, 10, seed=1) != epoch0  # the next pass is another order
    assert step_indices(3, 4, 10, seed=1) == step_indices(3, 4, 10, seed=1)  # a pure function of the step


# -----------------------------------------------------------------------------
# With the real tokenizer (trained here on a few sentences) and the real Engine


@pytest.fixture
def tokenizer(tmp_base_dir):
    from tokenizer import load_tokenizer, save_tokenizer, train_bpe
    texts = ["Mia has 3 apples. Tom gives Mia 2 more apples. How many apples does Mia have now?",
             "Mia has 3 + 2 = 5 apples.\n#### 5", "Let me use the calculator."] * 20
    save_tokenizer(train_bpe(texts, vocab_size=300, num_proc=1))
    return load_tokenizer()


def scripted_generate(script):
    """A stand-in for model.generate that writes `script` in every row, feeding in what force() returns as
    forced tokens (model.generate's protocol: per step one (token, forced) or None per row)."""
    def generate(model, rows, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_tokens=(), seed=None,
                 force=None, vocab_size=0, compile=False):
        out = [[] for _ in rows]
        for r in range(len(rows)):
            queue = [(t, False) for t in script]
            while queue and len(out[r]) < max_new_tokens:
                token, forced = queue.pop(0)
                out[r].append((token, forced))
                extra = force(r, [t for t, _ in out[r]]) if force and not forced else None
                queue[:0] = [(t, True) for t in extra or []]
        for i in range(max(map(len, out))):
            yield [o[i] if i < len(o) else None for o in out]
    return generate


def test_rows_from_the_engine_exclude_prompt_and_calculator_output(tokenizer, monkeypatch):
    import model
    from data.grade import grade, sample_groups
    s = tokenizer.special
    script = (tokenizer.encode("Let me use the calculator.") + [s("<|python_start|>")] + tokenizer.encode("3+2") +
              [s("<|python_end|>")] + tokenizer.encode("\n#### 5") + [s("<|assistant_end|>")])
    monkeypatch.setattr(model, "generate", scripted_generate(script))
    engine = model.Engine(None, tokenizer)
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "Mia has 3 apples. How many now?"}])
    [[sample, _]] = sample_groups(engine, [prompt], ["Mia has 5.\n#### 5"], num_samples=2, max_new_tokens=64,
                                  temperature=1.0, top_k=0, seed=0, grader=grade, format_bonus=0.25)
    tokens, mask, reward, correct = sample.tokens, sample.mask, sample.reward, sample.correct
    forced = [s("<|output_start|>")] + tokenizer.encode("5") + [s("<|output_end|>")]
    cut = script.index(s("<|python_end|>")) + 1
    assert tokens == script[:cut] + forced + script[cut:]
    assert (reward, correct) == (1.25, True)  # right, and ended its turn on "#### 5"
    x, y, m = make_row(prompt, tokens, mask)
    assert [t for t, k in zip(y, m) if k] == script  # exactly what the policy wrote, end token included
    assert not any(m[:len(prompt) - 1]) and x[:len(prompt)] == prompt


# -----------------------------------------------------------------------------
# End to end: `rl.py` on a tiny random GPT saved as the sft model, with the small prepared world's problems.
# A random model never answers right, so the grader is replaced by one that rewards answers of even length in
# characters: groups then have both rewards, and the updates are real.


@pytest.fixture
def sft_model(world):
    from model import config_from_depth
    model = save_random_model("sft", config_from_depth(1, load_tokenizer().vocab_size, 256, aspect_ratio=64,
                                                       head_dim=32))
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_here(monkeypatch, script, args, report):
    """python SCRIPT ARGS in this process (so that tests can replace the grader or model.generate); returns the
    report section `report`."""
    monkeypatch.setattr(sys, "argv", [script, "--device=cpu", *args])
    # one thread: a tiny model's matmuls only lose to thread hand-offs (and the test machine is shared)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(common.get_base_dir(), "report", f"{report}.json")) as f:
        return json.load(f)


def run_rl(monkeypatch, *args, script="rl.py"):
    """python rl.py ARGS (or dpo.py) with tiny sampling settings and a grader that rewards answers of even length."""
    monkeypatch.setattr(data.grade, "grade", lambda text, reference: len(text) % 2 == 0)
    return run_here(monkeypatch, script, ["--max_new_tokens=12", "--prompts_per_step=2", "--num_samples=4",
                                          "--eval_problems=2", "--eval_samples=2", *args], "rl")


def rl_weights(step):
    state, _, meta = common.load_checkpoint(common.checkpoint_dir("rl", "tiny"), step, load_rank_state=False)
    assert meta["step"] == step and meta["tokenizer_hash"] and meta["model_config"]["n_layer"] == 1
    return state


def test_grpo_steps_move_the_right_way_and_resume_continues(sft_model, monkeypatch):
    calls = record_training_samples(monkeypatch)
    report = run_rl(monkeypatch, "--num_steps=2", "--eval_every=2", "--loss_norm=sequence", "--std_norm=1",
                    "--ppo_epochs=2", "--kl_coef=0.1", "--save_every=1")
    history = report["history"]
    assert [s for s, _ in history["pass1"]] == [0, 2] and [s for s, _ in history["reward"]] == [1, 2]
    assert {"pass2", "greedy_pass1", "response_len", "zero_std", "kl", "clipped"} <= set(history)
    assert report["metrics"]["train_minutes"] > 0
    # GRPO as published plus PPO's second epoch and the KL term: the first step still moves every answer its way
    [(prompts, groups)] = calls
    assert_rewarded_answers_became_likelier(prompts, groups, sft_model, rl_weights(1))
    state = rl_weights(2)
    # --resume=1 goes on from step 2 with the saved history
    report = run_rl(monkeypatch, "--num_steps=3", "--eval_every=0", "--resume=1")
    assert [s for s, _ in report["history"]["reward"]] == [1, 2, 3]
    assert any(not torch.equal(rl_weights(3)[k], state[k]) for k in state)


def record_training_samples(monkeypatch, step=0, seed=42):
    """Keep what rl.py's loop samples at `step` to train on (the evaluation samples too, but with other seeds):
    a list that gets its (prompts, groups)."""
    calls, sample_groups = [], data.grade.sample_groups

    def recording(engine, prompts, references, **kwargs):
        groups = sample_groups(engine, prompts, references, **kwargs)
        if kwargs["seed"] == common.derive_seed(seed, "train", step, 0):
            calls.append(([list(p) for p in prompts], groups))
        return groups
    monkeypatch.setattr(data.grade, "sample_groups", recording)
    return calls


def assert_rewarded_answers_became_likelier(prompts, groups, before, after, baseline="group"):
    """Every answer that did better than its baseline is likelier under the weights `after` than `before`, every
    one that did worse less likely. baseline: "group", its group's mean reward (GRPO); "step", the mean reward over
    all the step's trained tokens (PPO's whitened advantages while the critic still says 0 everywhere)."""
    rewards = torch.tensor([[sample.reward for sample in group] for group in groups])  # (P, G)
    if baseline == "group":
        advantages = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G); the sign is the same with std_norm
    else:
        tokens = torch.tensor([[sum(sample.mask) for sample in group] for group in groups])  # (P, G)
        advantages = rewards - (rewards * tokens).sum() / tokens.sum()  # (P, G)
    assert (advantages > 0).any() and (advantages < 0).any()
    answers = [(prompt, sample.tokens, sample.mask) for prompt, group in zip(prompts, groups) for sample in group]
    change = (answer_logprobs(after, answers) - answer_logprobs(before, answers)).view_as(advantages)  # (P, G)
    assert (change[advantages > 0] > 0).all() and (change[advantages < 0] < 0).all(), (advantages, change)


def answer_logprobs(state, answers):
    """log p(answer | prompt) of (prompt, tokens, mask) answers under the weights `state`, each summed over the
    tokens the policy chose (mask 1: its own, not the forced calculator outputs), (N,)."""
    _, _, meta = common.load_checkpoint(common.checkpoint_dir("sft", "tiny"), load_rank_state=False)
    model = GPT(GPTConfig(**meta["model_config"]))
    model.load_state_dict(state)
    x, y, m = collate([make_row(prompt, tokens, mask) for prompt, tokens, mask in answers], "cpu")
    with torch.no_grad():
        return (token_logprobs(model, x, y) * m).sum(dim=1)


def test_one_grpo_step_raises_the_logprob_of_rewarded_answers(sft_model, monkeypatch):
    # nanochat's defaults: one step on the samples, no std division, no KL (measured: each answer's log-probability
    # moves by 0.8 to 1 nat, so its sign is far from chance)
    calls = record_training_samples(monkeypatch)
    run_rl(monkeypatch, "--num_steps=1", "--eval_every=0")
    [(prompts, groups)] = calls
    assert_rewarded_answers_became_likelier(prompts, groups, sft_model, rl_weights(1))


def test_ptx_alone_makes_the_steps_sft_conversations_likelier(sft_model, monkeypatch):
    # every answer scores 0, so the policy gradient is exactly zero and the step is the SFT loss's alone
    monkeypatch.setattr(data.grade, "grade", lambda text, reference: False)
    report = run_here(monkeypatch, "rl.py", ["--max_new_tokens=12", "--prompts_per_step=2", "--num_samples=4",
                                             "--num_steps=1", "--eval_every=0", "--ptx_coef=1", "--ptx_rows=4"], "rl")
    assert report["history"]["ptx"][0][1] > 0
    tok = load_tokenizer()
    convs = load_conversations("train")
    rows = []
    for i in step_indices(0, 4, len(convs), 42):  # the step's conversations, as rl.py draws them
        ids, mask = tok.render_conversation(convs[i], max_len=256)
        rows.append(Row(ids[:-1], ids[1:], mask[1:]))
    x, y, m = collate(rows, "cpu")
    nll = {}
    for name, state in (("sft", sft_model), ("rl", rl_weights(1))):
        model = GPT(GPTConfig(**common.load_checkpoint(common.checkpoint_dir("sft", "tiny"),
                                                       load_rank_state=False)[2]["model_config"]))
        model.load_state_dict(state)
        with torch.no_grad():
            nll[name] = -(token_logprobs(model, x, y) * m).sum() / m.sum()
    assert nll["rl"] < nll["sft"] - 0.01
    assert report["history"]["ptx"][0][1] == pytest.approx(nll["sft"].item(), rel=1e-4)  # the loss it trained on


def test_one_ppo_step_raises_the_logprob_of_rewarded_answers(sft_model, monkeypatch):
    # lambda 1, no KL penalty, no entropy bonus, one minibatch: the critic starts at 0, so each trained token's
    # advantage is its answer's reward, whitened over the step's tokens: positive for a right answer, negative for a
    # wrong one
    calls = record_training_samples(monkeypatch)
    run_rl(monkeypatch, "--algo=ppo", "--num_steps=1", "--eval_every=0", "--gae_lambda=1", "--kl_penalty=0",
           "--ent_coef=0", "--num_minibatches=1")
    [(prompts, groups)] = calls
    assert_rewarded_answers_became_likelier(prompts, groups, sft_model, rl_weights(1), baseline="step")


def test_ppo_trains_policy_and_critic_saves_the_critic_apart_and_resume_restores_it(sft_model, monkeypatch):
    report = run_rl(monkeypatch, "--algo=ppo", "--num_steps=2", "--eval_every=2", "--ppo_epochs=2",
                    "--num_minibatches=2", "--kl_penalty=0.1")
    history = report["history"]
    assert report["algo"] == "ppo" and [s for s, _ in history["pass1"]] == [0, 2]
    assert {"value_loss", "entropy", "kl", "clipped"} <= set(history) and history["value_loss"][0][1] > 0
    state = rl_weights(2)  # the model file is the policy alone: it loads into a plain GPT
    assert any(not torch.equal(state[k], sft_model[k]) for k in sft_model)
    model, _, _ = common.load_model("rl", model_tag="tiny")
    ckpt_dir = common.checkpoint_dir("rl", "tiny")
    critic = torch.load(os.path.join(ckpt_dir, "optim_000002_rank0.pt"), weights_only=True)["critic"]
    assert critic["lm_head.weight"].shape == (1, model.config.n_embd) and critic["lm_head.weight"].abs().sum() > 0
    # resumed at its last step, the run has nothing left to do and saves again: the critic it restored
    run_rl(monkeypatch, "--algo=ppo", "--num_steps=2", "--eval_every=0", "--resume=1")
    again = torch.load(os.path.join(ckpt_dir, "optim_000002_rank0.pt"), weights_only=True)["critic"]
    assert all(torch.equal(again[k], critic[k]) for k in critic)
    report = run_rl(monkeypatch, "--algo=ppo", "--num_steps=3", "--eval_every=0", "--resume=1", "--num_samples=1",
                    "--num_minibatches=1")  # PPO needs no group
    assert [s for s, _ in report["history"]["reward"]] == [1, 2, 3]
    with pytest.raises(SystemExit, match="another algo"):
        run_rl(monkeypatch, "--num_steps=4", "--resume=1")


def test_a_zero_variance_group_gives_exactly_zero_gradient(sft_model):
    _, _, meta = common.load_checkpoint(common.checkpoint_dir("sft", "tiny"), load_rank_state=False)
    model = GPT(GPTConfig(**meta["model_config"]))
    model.load_state_dict(sft_model)
    rows = [make_row([1, 2, 3], [4, 5, 6, 7], [1, 1, 0, 1]), make_row([1, 2], [9, 8], [1, 1])]
    x, y, m = collate(rows, "cpu")
    logp = token_logprobs(model, x, y)
    weights = rl.token_weights(m, "token", 2, m.sum().item(), 4)
    advantages = rl.group_advantages(torch.tensor([[1.0, 1.0]]))[0]  # all rewards equal -> (0, 0)
    loss, _ = rl.policy_loss(logp, logp.detach(), advantages, weights, 0.2, 0.28)
    loss.backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())


@pytest.mark.parametrize("extra, message", [
    (["--loss_norm=tokens"], "loss_norm must be"), (["--num_samples=1"], "at least 2"),
    (["--pairs=x.jsonl"], "unknown config key 'pairs'"),  # DPO's setting: dpo.py
    (["--dataset=nope"], "unknown math dataset"), (["--max_new_tokens=300"], "leaves no room"),
    (["--algo=sac"], "algo must be grpo or ppo"), (["--algo=ppo", "--kl_coef=0.1"], "are GRPO's"),
    (["--algo=ppo", "--ptx_coef=0.5"], "are GRPO's"), (["--ptx_coef=0.5", "--ptx_rows=0"], "ptx_rows=0 must be"),
    (["--algo=ppo", "--num_minibatches=9"], "num_minibatches <= the answers"),  # 2 problems x 4 answers
])
def test_bad_settings_are_one_clear_error(sft_model, monkeypatch, extra, message):
    with pytest.raises(SystemExit, match=message):
        run_rl(monkeypatch, *extra)
