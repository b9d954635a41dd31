import math

import pytest
import torch

from vlrl_cli.losses import aggregate, group_advantages, k3_kl, keep_informative_groups, mismatch_weights, policy_loss


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups, std_norm=True, eps=0.0)
    # group 0: mean 1/3, sample std sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert torch.allclose(adv[:3], torch.tensor([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s]))
    assert torch.allclose(adv[3:], torch.tensor([(-2 / 3) / s, (1 / 3) / s, (1 / 3) / s]))
    dr = group_advantages(rewards, groups, std_norm=False)
    assert torch.allclose(dr, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    same = group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long))
    assert torch.equal(same, torch.zeros(4))


def test_dynamic_sampling_keeps_only_mixed_groups():
    keep = keep_informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert keep.tolist() == [False, False, True, True, False, False]


def test_clip_higher_bounds_by_hand():
    old = torch.zeros(1, 3)
    train = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    mask = torch.ones(1, 3)
    w = torch.ones(1, 3)
    loss, clipped = policy_loss(train, old, torch.tensor([1.0]), mask, w, clip_low=0.2, clip_high=0.28)
    # A > 0: min(r, clip(r)) -> 1.28, 0.5, 1.1
    assert torch.allclose(loss, -torch.tensor([[1.28, 0.5, 1.1]]))
    assert clipped.tolist() == [[1.0, 0.0, 0.0]]
    loss, clipped = policy_loss(train, old, torch.tensor([-1.0]), mask, w, clip_low=0.2, clip_high=0.28)
    # A < 0: min(-r, -clip(r)) -> -1.5, -0.8, -1.1
    assert torch.allclose(loss, torch.tensor([[1.5, 0.8, 1.1]]))
    assert clipped.tolist() == [[0.0, 1.0, 0.0]]


def test_loss_aggregations_by_hand():
    tok = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate(tok, mask, "token-mean", 4, 2, 8).item() == pytest.approx(10 / 4)
    assert aggregate(tok, mask, "seq-mean-token-mean", 4, 2, 8).item() == pytest.approx((2 + 4) / 2)
    assert aggregate(tok, mask, "seq-mean-token-sum-norm", 4, 2, 8).item() == pytest.approx(10 / (8 * 2))
    # micro-batches with the step's totals add up to the full-batch value
    parts = sum(aggregate(tok[i:i + 1], mask[i:i + 1], "token-mean", 4, 2, 8) for i in range(2))
    assert parts.item() == pytest.approx(10 / 4)


def test_mismatch_weights():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    engine = torch.log(torch.tensor([[0.5, 2.0, 0.1]]))  # exp(old - engine) = 2, 0.5, 10
    mask = torch.ones(1, 3)
    tis = mismatch_weights(old, engine, mask, "tis", cap=3.0)
    assert torch.allclose(tis, torch.tensor([[2.0, 0.5, 3.0]]))
    seq = mismatch_weights(old, engine, mask, "mask", cap=2.0)  # mean log ratio log(10)/3 = 0.77 > log 2
    assert seq.sum() == 0
    ok = mismatch_weights(old, old + 0.01, mask, "mask", cap=2.0)
    assert torch.equal(ok, torch.ones(1, 3))
    assert torch.equal(mismatch_weights(old, engine, mask, "none", 2.0), torch.ones(1, 3))


def test_k3_kl_is_zero_at_equality_and_positive_otherwise():
    a = torch.tensor([-1.0, -2.0])
    assert torch.allclose(k3_kl(a, a), torch.zeros(2))
    b = torch.tensor([-1.5, -1.0])
    d = b - a
    assert torch.allclose(k3_kl(a, b), torch.exp(d) - d - 1) and (k3_kl(a, b) > 0).all()
