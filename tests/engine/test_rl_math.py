"""engine/rl.py against numbers worked out by hand (in the comments), not against the code itself."""
import math

import pytest
import torch

from rlhf_engine import rl
from rlhf_engine.config import PPOConfig


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=tol)


# --------------------------------------------------------------------------------------------
# shaping
def test_shape_rewards_puts_score_on_last_valid_token_and_kl_elsewhere():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 5.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.0, -3.0]])  # row 1, t=2 is padding garbage
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([1.0, -2.0])
    rewards, kl = rl.shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1, estimator="k1")
    # k1 = logp - ref: [[0.5, 0, 0.5], [-0.5, 0, (masked)]]
    close(kl, [[0.5, 0.0, 0.5], [-0.5, 0.0, 0.0]])
    # -0.1 * kl, plus the score on the last mask=1 token: row 0 at t=2, row 1 at t=1
    close(rewards, [[-0.05, 0.0, -0.05 + 1.0], [0.05, -2.0, 0.0]])

    _, kl3 = rl.shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1, estimator="k3")
    # k3(r=0.5) = exp(-0.5) - 1 + 0.5 = 0.1065307; k3(-0.5) = exp(0.5) - 1 - 0.5 = 0.1487213
    close(kl3, [[0.1065307, 0.0, 0.1065307], [0.1487213, 0.0, 0.0]])


def test_shape_rewards_rejects_empty_response():
    with pytest.raises(ValueError, match=r"rows \[1\] have no response token"):
        rl.shape_rewards(torch.ones(2), torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[1, 0], [0, 0]]), 0.1)


def test_score_processing():
    close(rl.clip_scores(torch.tensor([-5.0, 0.5, 3.0]), 2.0), [-2.0, 0.5, 2.0])
    close(rl.clip_scores(torch.tensor([-5.0]), None), [-5.0])
    close(rl.apply_missing_eos_penalty(torch.tensor([1.0, 1.0]), torch.tensor([True, False]), -3.0), [1.0, -2.0])

    moments = rl.RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    batch_mean, batch_std = moments.update(torch.tensor([4.0, 5.0]))
    assert (batch_mean, batch_std) == pytest.approx((4.5, math.sqrt(0.5)))
    # all of 1..5: mean 3, sample var (4+1+0+1+4)/4 = 2.5
    assert moments.mean == pytest.approx(3.0) and moments.std == pytest.approx(math.sqrt(2.5))
    close(moments.normalize(torch.tensor([math.sqrt(2.5)])), [1.0])
    restored = rl.RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.mean, restored.std, restored.count) == (moments.mean, moments.std, 5)


# --------------------------------------------------------------------------------------------
# advantages
def test_gae_by_hand_and_nothing_flows_past_the_mask():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kw = dict(response_mask=mask, gamma=0.9, lam=0.8, whiten=False)
    adv, ret = rl.compute_advantages("ppo", rewards=rewards, values=values, **kw)
    # row 0, gamma*lam = 0.72:
    #   d2 = 1 - 0.7 = 0.3                  A2 = 0.3
    #   d1 = 0 + 0.9*0.7 - 0.6 = 0.03       A1 = 0.03 + 0.72*0.3 = 0.246
    #   d0 = 0 + 0.9*0.6 - 0.5 = 0.04       A0 = 0.04 + 0.72*0.246 = 0.21712
    # row 1 ends at t=1 (V after it counts as 0):
    #   d1 = 2 - 1 = 1                      A1 = 1
    #   d0 = 0 + 0.9*1 - 1 = -0.1           A0 = -0.1 + 0.72*1 = 0.62
    close(adv, [[0.21712, 0.246, 0.3], [0.62, 1.0, 0.0]])
    close(ret, [[0.71712, 0.846, 1.0], [1.62, 2.0, 0.0]])

    # garbage past the end of row 1 changes nothing, whitened or not
    rewards2, values2 = rewards.clone(), values.clone()
    rewards2[1, 2], values2[1, 2] = -7.0, float("nan")
    for whiten in (False, True):
        kw["whiten"] = whiten
        a1, r1 = rl.compute_advantages("ppo", rewards=rewards, values=values, **kw)
        a2, r2 = rl.compute_advantages("ppo", rewards=rewards2, values=values2, **kw)
        close(a2, a1)
        close(r2, r1)
    # whitening: the 5 valid advantages get mean 0 and unbiased std 1, padding stays 0
    valid = a1[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6) and valid.std().item() == pytest.approx(1.0, abs=1e-4)
    assert a1[1, 2].item() == 0.0


def test_grpo_and_rloo_on_a_tiny_group():
    # per-token shaped rewards whose row sums (score - beta*sum KL) are 1, 2, 6; the third row's t=1 is padding
    rewards = torch.tensor([[-0.5, 1.5], [0.0, 2.0], [6.0, 999.0], [0.3, 0.0], [0.3, 0.0], [0.3, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    adv, ret = rl.compute_advantages("grpo", rewards=rewards, response_mask=mask, group_size=3, whiten=True)
    # group 1: mean 3, sample std sqrt((4+1+9)/2) = sqrt(7) = 2.6457513 -> -2/., -1/., 3/.
    # group 2: identical returns -> 0 (eps keeps it finite)
    assert ret is None
    close(adv, [[-0.7559289] * 2, [-0.3779645] * 2, [1.1338934, 0.0], [0.0] * 2, [0.0] * 2, [0.0] * 2])

    adv, ret = rl.compute_advantages("rloo", rewards=rewards, response_mask=mask, group_size=3, whiten=False)
    # 1 - (2+6)/2 = -3;  2 - (1+6)/2 = -1.5;  6 - (1+2)/2 = 4.5;  group 2 all 0
    close(adv, [[-3.0] * 2, [-1.5] * 2, [4.5, 0.0], [0.0] * 2, [0.0] * 2, [0.0] * 2])

    with pytest.raises(ValueError, match="group_size"):
        rl.compute_advantages("grpo", rewards=rewards[:5], response_mask=mask[:5], group_size=3)


def test_reinforce_pp_returns_to_go_then_batch_whitening():
    rewards = torch.tensor([[0.0, 1.0], [2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv, ret = rl.compute_advantages("reinforce++", rewards=rewards, response_mask=mask, gamma=0.5)
    # G: row 0 = [0 + 0.5*1, 1] = [0.5, 1]; row 1 = [2] (the 5 is padding)
    # mean 7/6; unbiased var ((-2/3)^2 + (-1/6)^2 + (5/6)^2) / 2 = 0.5833333, std 0.7637626
    assert ret is None
    close(adv, [[-0.8728716, -0.2182179], [1.0910895, 0.0]], tol=1e-4)


def test_registry_rejects_unknown_names_and_accepts_new_ones():
    with pytest.raises(ValueError) as err:
        rl.compute_advantages("dpo", rewards=torch.zeros(1, 1), response_mask=torch.ones(1, 1))
    assert "unknown advantage estimator 'dpo'" in str(err.value)
    for name in ("grpo", "ppo", "reinforce++", "rloo"):
        assert name in str(err.value)
    # every config literal has an estimator, and only the critic-based algorithms need a critic
    assert set(PPOConfig.model_fields["algorithm"].annotation.__args__) <= set(rl.ADVANTAGE_ESTIMATORS)
    assert [n for n in sorted(rl.ADVANTAGE_ESTIMATORS) if rl.needs_critic(n)] == ["a2c", "nlpo", "ppo", "trpo"]

    @rl.register_advantage_estimator("score-only")
    def score_only(*, rewards, response_mask, **_):
        return rewards.sum(-1, keepdim=True) * response_mask, None
    try:
        adv, _ = rl.compute_advantages("score-only", rewards=torch.tensor([[1.0, 2.0]]),
                                       response_mask=torch.ones(1, 2), gamma=1.0)
        close(adv, [[3.0, 3.0]])
        with pytest.raises(ValueError, match="registered twice"):
            rl.register_advantage_estimator("score-only")(score_only)
    finally:
        rl.ADVANTAGE_ESTIMATORS.pop("score-only")


# --------------------------------------------------------------------------------------------
# losses
def test_policy_loss_clipping_cases():
    # one token each: (A=+1, rho=1.5) (A=+1, rho=0.5) (A=-1, rho=1.5) (A=-1, rho=0.5), eps = 0.2
    ratios = torch.tensor([[1.5, 0.5, 1.5, 0.5]])
    logprobs = ratios.log().requires_grad_(True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = rl.policy_loss(logprobs, old, adv, torch.ones(1, 4), cliprange=0.2)
    # per token max(-A*rho, -A*clip(rho)):
    #   max(-1.5, -1.2) = -1.2 (clipped)   max(-0.5, -0.8) = -0.5
    #   max( 1.5,  1.2) =  1.5             max( 0.5,  0.8) =  0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # k3(old || new) = rho - 1 - log rho: 0.0945349 (rho 1.5), 0.1931472 (rho 0.5)
    assert stats["approx_kl"].item() == pytest.approx((0.0945349 + 0.1931472) / 2, abs=1e-6)
    loss.backward()
    # clipped tokens get no gradient; the others d(-A*rho)/dlogp = -A*rho, divided by 4 tokens
    close(logprobs.grad, [[0.0, -0.5 / 4, 1.5 / 4, 0.0]])


def test_policy_loss_aggregation_modes():
    logprobs = torch.tensor([[1.5, 0.5, 1.0], [1.5, 1.0, 1.0]]).log()  # ratios vs old log-probs of 0
    adv = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # token losses: row 0 [-1.2, -0.5], row 1 [1.5]
    tok, _ = rl.policy_loss(logprobs, torch.zeros(2, 3), adv, mask, 0.2, loss_agg="token-mean")
    seq, _ = rl.policy_loss(logprobs, torch.zeros(2, 3), adv, mask, 0.2, loss_agg="seq-mean-token-mean")
    assert tok.item() == pytest.approx((-1.2 - 0.5 + 1.5) / 3)
    assert seq.item() == pytest.approx(((-1.2 - 0.5) / 2 + 1.5) / 2)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        rl.policy_loss(logprobs, torch.zeros(2, 3), adv, mask, 0.2, loss_agg="sum")


def test_value_loss_clip():
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[1.5, 1.1, 0.5, 0.5]], requires_grad=True)
    returns = torch.tensor([[2.0, 2.0, 0.0, 2.0]])
    loss, stats = rl.value_loss(values, old, returns, torch.ones(1, 4), cliprange_value=0.2)
    # clipped V = [1.2, 1.1, 0.8, 0.8]
    # (V-R)^2 = [0.25, 0.81, 0.25, 2.25];  (Vclip-R)^2 = [0.64, 0.81, 0.64, 1.44]
    # max = [0.64 (clipped), 0.81, 0.64 (clipped), 2.25] -> 0.5 * 4.34 / 4
    assert loss.item() == pytest.approx(0.5 * 4.34 / 4)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # only unclipped tokens carry gradient: 0.5 * 2 (V - R) / 4
    close(values.grad, [[0.0, (1.1 - 2.0) / 4, 0.0, (0.5 - 2.0) / 4]])


def test_entropy_bonus_lowers_the_loss_with_more_entropy():
    bonus = rl.entropy_bonus(torch.tensor([[2.0, 4.0, 100.0]]), torch.tensor([[1, 1, 0]]), entropy_coef=0.01)
    assert bonus.item() == pytest.approx(-0.01 * 3.0)


# --------------------------------------------------------------------------------------------
# KL controllers and EMA
def test_adaptive_kl_controller_numbers_and_state():
    ctl = rl.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9: e = 9/6 - 1 = 0.5 -> clipped 0.2; beta = 0.1 * (1 + 0.2 * 256/10000) = 0.100512
    assert ctl.update(9.0, 256) == pytest.approx(0.100512)
    # KL 5.4: e = -0.1; beta = 0.100512 * (1 - 0.1 * 1000/10000) = 0.09950688
    assert ctl.update(5.4, 1000) == pytest.approx(0.09950688)
    restored = rl.AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value

    fixed = rl.make_kl_controller(PPOConfig(kl_coef=0.2))
    assert isinstance(fixed, rl.FixedKLController) and fixed.update(100.0, 64) == 0.2
    adaptive = rl.make_kl_controller(PPOConfig(kl_coef=0.2, kl_controller="adaptive", target_kl=3.0, kl_horizon=100))
    # KL 0: e = -1 -> clipped -0.2; beta = 0.2 * (1 - 0.2 * 10/100) = 0.196
    assert adaptive.update(0.0, 10) == pytest.approx(0.196)


def test_ema_update():
    ema, param = [torch.tensor([0.0, 10.0])], [torch.tensor([1.0, 0.0])]
    rl.ema_update(ema, param, decay=0.9)
    close(ema[0], [0.1, 9.0])
