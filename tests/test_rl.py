"""rl.py: advantages, the three loss normalisations, PPO clipping and the k3 KL on hand-computed numbers, the DPO
loss, training masks (prompt and calculator outputs excluded), and short end-to-end runs of `rl.py` (GRPO with
resume, DPO from a pairs file and from sampled pairs) on a tiny random GPT with a tokenizer trained in the test."""
import json
import math
import os
import runpy
import sys

import pytest
import torch

import rl

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


def test_score_and_format_bonus():
    grader = lambda text, ref: text.strip().endswith(ref.split("####")[-1].strip())
    assert rl.score("2 + 3 = 5\n#### 5", "#### 5", True, grader, 0.1) == (1.1, True)
    assert rl.score("2 + 3 = 5\n#### 5", "#### 5", False, grader, 0.1) == (1.0, True)  # cut off: no bonus
    assert rl.score("2 + 3 = 6\n#### 6", "#### 5", True, grader, 0.1) == (0.1, False)  # wrong but well formed
    assert rl.score("it is 6", "#### 5", True, grader, 0.1) == (0.0, False)


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
# DPO


def test_dpo_loss_is_the_formula():
    # pair 1: beta * ((-1 - -2) - (-3 - -2)) = 0.5 * 2 = 1 -> -log sigmoid(1) = log(1 + e^-1) = 0.313262
    # pair 2: margin 0 -> log 2 = 0.693147
    pc, pr = torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0])
    rc, rr = torch.tensor([-2.0, -5.0]), torch.tensor([-2.0, -4.0])
    loss, acc = rl.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx((0.313262 + 0.693147) / 2, abs=1e-5)
    assert acc.item() == 0.5


def test_pairs_from_groups_pair_first_right_with_first_wrong():
    groups = [[("a", False), ("b", True), ("c", True), ("d", False)], [("e", True), ("f", True)], [("g", False)]]
    assert rl.pairs_from_groups([[1], [2], [3]], groups) == [([1], "b", "a")]


# -----------------------------------------------------------------------------
# Rows and masks


def test_rows_train_only_on_the_tokens_the_policy_chose():
    # prompt 1 2 3; the answer 10 [11 12 forced calculator output] 13 14
    x, y, m = rl.make_row([1, 2, 3], [10, 11, 12, 13, 14], [1, 0, 0, 1, 1])
    assert x == [1, 2, 3, 10, 11, 12, 13]
    assert y == [2, 3, 10, 11, 12, 13, 14]
    assert m == [0, 0, 1, 0, 0, 1, 1]
    xb, yb, mb = rl.collate([(x, y, m), ([5, 6], [6, 7], [0, 1])], "cpu")
    assert xb.tolist() == [x, [5, 6, 0, 0, 0, 0, 0]]
    assert yb.tolist() == [[-1, -1, 10, -1, -1, 13, 14], [-1, 7, -1, -1, -1, -1, -1]]
    assert mb.tolist() == [m, [0, 1, 0, 0, 0, 0, 0]]


def test_step_indices_cover_the_data_then_reshuffle():
    first = rl.step_indices(0, 4, 10, seed=1) + rl.step_indices(1, 4, 10, seed=1)
    epoch0 = rl.step_indices(0, 10, 10, seed=1)
    assert first == epoch0[:8] and sorted(epoch0) == list(range(10))
    assert rl.step_indices(1, 10, 10, seed=1) != epoch0  # the next pass is another order
    assert rl.step_indices(3, 4, 10, seed=1) == rl.step_indices(3, 4, 10, seed=1)  # a pure function of the step
