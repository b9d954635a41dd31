import math

import pytest
import torch

from vlrl_cli.train.losses import aggregate, group_advantages, k3_kl, keep_informative_groups, mismatch_weights, policy_loss


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


def test_dr_grpo_length_is_an_answer_per_turn_and_never_more_than_the_context():
    """Dr. GRPO divides by the longest a trained sequence can be: max_new_tokens per turn of the longest
    episode, capped by the context (a gymnasium env allowed 100,000 moves would otherwise divide every
    gradient by 6.4 million)."""
    from pathlib import Path

    from vlrl_cli.train.grpo import dr_grpo_length
    from vlrl_cli.train.recipe import load_recipe, with_overrides

    shipped = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "maze2d.yaml", check_paths=False)
    maze = with_overrides(shipped, ["rollout.max_turns=null"])  # as many turns as the environment allows
    rows = [{"env_class": "maze2d", "extra_info": {"max_steps": 20}}]
    assert dr_grpo_length(maze, rows) == maze.rollout.max_new_tokens * 20
    endless = [{"env_class": "maze2d", "extra_info": {"max_steps": 1000}}]
    assert dr_grpo_length(maze, endless) == maze.rollout.max_context_tokens
    assert dr_grpo_length(shipped, endless) == shipped.rollout.max_new_tokens * shipped.rollout.max_turns


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


def test_two_ppo_epochs_by_hand_anchor_clipping_and_kl():
    """micro_batch_loss over two epochs of one sequence (2 trained tokens, advantage +1), every number by hand.

    Epoch 0: the policy is the anchor (ratio 1), so each token's surrogate is -1. Epoch 1: the policy moved to
    p = 0.75 (ratio 1.5, clipped at 1 + 0.28) and p = 0.22 (ratio 0.88, inside the band); the anchor stays.
    KL is k3 to a reference with p_ref = 0.4 and 0.25.
    """
    from types import SimpleNamespace

    from vlrl_cli.train.losses import micro_batch_loss

    algo = SimpleNamespace(clip_low=0.2, clip_high=0.28, mismatch="none", mismatch_cap=2.0, kl_coef=0.1, loss_agg="token-mean")
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    adv = torch.tensor([1.0])
    anchor = torch.log(torch.tensor([[1.0, 0.5, 0.25]]))
    ref = torch.log(torch.tensor([[1.0, 0.4, 0.25]]))
    engine = anchor.clone()

    def k3(p, r):  # exp(log r - log p) - (log r - log p) - 1
        return r / p - math.log(r / p) - 1

    loss0, clip0, kl0 = micro_batch_loss(anchor.clone(), anchor, engine, ref, adv, mask, algo, 2, 1, 3)
    assert float(loss0) == pytest.approx((-1 + 0.1 * k3(0.5, 0.4) - 1 + 0.1 * k3(0.25, 0.25)) / 2, abs=1e-6)
    assert float(clip0.sum()) == 0
    assert float((kl0 * mask).sum()) == pytest.approx(k3(0.5, 0.4), abs=1e-6)

    train = torch.log(torch.tensor([[1.0, 0.75, 0.22]])).requires_grad_()
    loss1, clip1, kl1 = micro_batch_loss(train, anchor, engine, ref, adv, mask, algo, 2, 1, 3)
    assert float(loss1.detach()) == pytest.approx((-1.28 + 0.1 * k3(0.75, 0.4) - 0.88 + 0.1 * k3(0.22, 0.25)) / 2, abs=1e-5)
    assert clip1.tolist() == [[0.0, 1.0, 0.0]]  # against the anchor, not against the current policy
    loss1.backward()
    # the clipped token gets gradient from the KL term only: d/dlogp k3 = 1 - p_ref / p
    assert float(train.grad[0, 1]) == pytest.approx(0.1 * (1 - 0.4 / 0.75) / 2, abs=1e-5)
    assert float(train.grad[0, 2]) == pytest.approx((-0.88 + 0.1 * (1 - 0.25 / 0.22)) / 2, abs=1e-5)

    # mismatch weights come from anchor vs engine, so they do not move between epochs
    algo.mismatch = "tis"
    engine2 = anchor - torch.tensor([[0.0, math.log(1.5), math.log(3.0)]])
    l_tis, _, _ = micro_batch_loss(anchor.clone(), anchor, engine2, None, adv, mask, algo, 2, 1, 3)
    assert float(l_tis) == pytest.approx((-1.5 - 2.0) / 2, abs=1e-5)  # weights exp(log 1.5), exp(log 3) capped at 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_logprobs_equal_the_whole_formula_values_and_gradients(dtype):
    """logprobs.token_logprobs works a few positions at a time (checkpointed in the backward); values and
    gradients must be those of the formula on the whole micro-batch at once."""
    from vlrl_cli.model.logprobs import token_logprobs

    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 37, 50
    base = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[tokens == 7] = 8  # a banned token is never the sampled one
    banned, temperature = [7, 11], 0.7

    def whole(logits):
        x = logits.float() / temperature
        x[..., banned] = float("-inf")
        return torch.log_softmax(x, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    weights = torch.randn(B, T, generator=g)
    a = base.clone().requires_grad_()
    ref = whole(a)
    (ref * weights).sum().backward()
    for chunk in (1, 5, 16, 128):
        b = base.clone().requires_grad_()
        got = token_logprobs(b, tokens, temperature, banned, chunk=chunk)
        torch.testing.assert_close(got, ref.detach(), rtol=0, atol=0)
        (got * weights).sum().backward()
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
    with torch.no_grad():  # the engine's path (no graph)
        torch.testing.assert_close(token_logprobs(base, tokens, temperature, banned, chunk=8), ref.detach(), rtol=0, atol=0)
