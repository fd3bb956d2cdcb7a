"""engine/rl.py's variants (DAPO, Dr.GRPO, GSPO, REINFORCE++-baseline, TIS/MIS, A2C, TRPO) against
numbers worked out by hand in the comments."""
import math

import pytest
import torch

from rlhf_engine import rl


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=tol)


X = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 99.0, 99.0, 99.0]])  # row 1 has one real token
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_loss_aggregations():
    close(rl.aggregate(X, MASK, "token-mean"), (1 + 2 + 3 + 4) / 4)  # 2.5
    close(rl.aggregate(X, MASK, "seq-mean-token-mean"), (2.0 + 4.0) / 2)  # 3.0
    close(rl.aggregate(X, MASK, "seq-mean-token-sum"), (6.0 + 4.0) / 2)  # 5.0
    close(rl.aggregate(X, MASK, "seq-mean-token-sum-norm"), (6.0 + 4.0) / 2 / 4)  # T = 4: 1.25
    with pytest.raises(ValueError, match="unknown loss_agg"):
        rl.aggregate(X, MASK, "sum")


@pytest.mark.parametrize("agg", rl.LOSS_AGGREGATIONS)
def test_micro_batch_weights_make_accumulation_exact(agg):
    x = torch.randn(4, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float32)
    parts = [slice(0, 1), slice(1, 4)]
    total = sum(rl.aggregate(x[p], mask[p], agg) * rl.micro_batch_weight(mask[p], mask, agg) for p in parts)
    close(total, rl.aggregate(x, mask, agg))


def test_asymmetric_clip():
    # rho = 1.5 and 0.5 (log-ratios ln 1.5, ln 0.5); eps_low 0.2, eps_high 0.28
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    mask = torch.ones(1, 2)
    # A = +1: token 0 -> max(-1.5, -1.28) = -1.28 (clipped at 1 + eps_high); token 1 -> max(-0.5, -0.8) = -0.5
    loss, stats = rl.policy_loss(logp, old, torch.ones(1, 2), mask, 0.2, cliprange_high=0.28)
    close(loss, (-1.28 - 0.5) / 2)
    close(stats["clipfrac"], 0.5)
    # A = -1: token 0 -> max(1.5, 1.28) = 1.5; token 1 -> max(0.5, 0.8) = 0.8 (clipped at 1 - eps_low)
    loss, _ = rl.policy_loss(logp, old, -torch.ones(1, 2), mask, 0.2, cliprange_high=0.28)
    close(loss, (1.5 + 0.8) / 2)
    # symmetric default: token 0 clipped at 1.2 for A = +1
    loss, _ = rl.policy_loss(logp, old, torch.ones(1, 2), mask, 0.2)
    close(loss, (-1.2 - 0.5) / 2)


def test_gspo_sequence_ratio_value_and_gradient():
    # row log-ratios [0.1, 0.3] -> s = exp(0.2) for both tokens; A = 1 and eps = 0.3 (no clip)
    logp = torch.tensor([[0.1, 0.3]], requires_grad=True)
    old, mask, adv = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)
    loss, stats = rl.policy_loss(logp, old, adv, mask, 0.3, "seq-mean-token-mean", ratio_level="sequence")
    s = math.exp(0.2)
    close(loss, -s)
    close(stats["ratio"], s)
    loss.backward()
    # GSPO: d(-s)/d logp_t = -s * 1/|y| for each token
    close(logp.grad, [[-s / 2, -s / 2]])
    # clipped: eps 0.1 -> s clipped to 1.1 for A > 0: constant, no gradient
    logp.grad = None
    loss, stats = rl.policy_loss(logp, old, adv, mask, 0.1, "seq-mean-token-mean", ratio_level="sequence")
    close(loss, -1.1)
    close(stats["clipfrac"], 1.0)
    loss.backward()
    close(logp.grad, [[0.0, 0.0]])


def test_dr_grpo_and_reinforce_pp_baseline_by_hand():
    # one group of 2, each a single-token response: sequence returns 1 and 3 (no KL)
    rewards = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    adv, ret = rl.compute_advantages("dr_grpo", rewards=rewards, response_mask=mask, group_size=2)
    close(adv, [[-1.0, 0.0], [1.0, 1.0]])  # R - mean(R) = -1, +1; no std division
    assert ret is None
    # baseline 2 on each last token: row 0 G = [-1]; row 1 G = [1, 1] (gamma 1)
    # whitened over the 3 tokens (-1, 1, 1): mean 1/3, var ((4/3)^2 + 2 (2/3)^2) / 2 = 4/3 (unbiased)
    adv, _ = rl.compute_advantages("reinforce++-baseline", rewards=rewards, response_mask=mask, group_size=2)
    sd = math.sqrt(4 / 3)
    close(adv, [[(-1 - 1 / 3) / sd, 0.0], [(2 / 3) / sd, (2 / 3) / sd]], tol=1e-4)


def test_critic_algorithms_share_gae():
    kw = dict(rewards=torch.tensor([[0.0, 1.0]]), values=torch.tensor([[0.5, 0.2]]),
              response_mask=torch.ones(1, 2), gamma=1.0, lam=1.0, whiten=False)
    ref = rl.compute_advantages("ppo", **kw)
    for name in ("a2c", "trpo", "nlpo"):
        assert rl.needs_critic(name)
        close(rl.compute_advantages(name, **kw)[0], ref[0])


def test_overlong_penalty_and_group_filter():
    # max 20 tokens, buffer 4: no penalty up to 16; 18 -> -(2/4); 20 -> -1; x factor 0.5
    close(rl.overlong_penalty(torch.tensor([10, 16, 18, 20]), 20, 4, 0.5), [0.0, 0.0, -0.25, -0.5])
    with pytest.raises(ValueError, match="overlong_buffer"):
        rl.overlong_penalty(torch.tensor([1]), 20, 0)
    keep = rl.groups_with_signal(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2)
    assert keep.tolist() == [False, True, False]


def test_rollout_correction_modes():
    old = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    gen = torch.log(torch.tensor([[1.0, 0.25, 2.0], [0.5, 0.5, 1.0]]))  # w = pi_train / pi_gen
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # w = [[1, 4, 0.5], [2, 2, (pad)]]
    weights, stats = rl.rollout_correction(old, gen, mask, "tis", cap=3.0)
    close(weights, [[1.0, 3.0, 0.5], [2.0, 2.0, 0.0]])
    close(stats["is/corrected_frac"], 1 / 5)
    close(stats["is/weight_mean"], (1 + 4 + 0.5 + 2 + 2) / 5)
    weights, _ = rl.rollout_correction(old, gen, mask, "mis-token", cap=3.0)  # keep 1/3 <= w <= 3
    close(weights, [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    # sequence: geometric means row 0 exp((0 + ln4 + ln0.5)/3) = 2^(1/3) ~ 1.26 kept; row 1 = 2 dropped at cap 1.5
    weights, stats = rl.rollout_correction(old, gen, mask, "mis-sequence", cap=1.5)
    close(weights, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    close(stats["is/corrected_frac"], 2 / 5)
    assert rl.rollout_correction(old, gen, mask, "none", 2.0) == (None, {})
    # the weights multiply the per-token clipped loss: A = 1, rho = 1 -> loss = -mean(weights)
    loss, _ = rl.policy_loss(old, old, torch.ones(2, 3), mask, 0.2, weights=torch.tensor([[1.0, 3.0, 0.5], [2.0, 2.0, 0.0]]))
    close(loss, -(1 + 3 + 0.5 + 2 + 2) / 5)


def test_mismatch_sums():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    gen = torch.tensor([[-1.0, -2.5, 7.0]])  # the last token is padding
    sums = rl.mismatch_sums(logp, gen, torch.tensor([[1.0, 1.0, 0.0]]), threshold=0.1)
    # |d| = [0, 0.5]: sum exp = 1 + e^0.5, max 0.5, 1 over the threshold, 2 tokens
    close(sums, [1 + math.exp(0.5), 0.5, 1.0, 2.0])


def test_a2c_and_trpo_pieces():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0]])
    loss = rl.a2c_policy_loss(logp, adv, torch.ones(1, 2))
    close(loss, (2.0 * 1.0 + -1.0 * 2.0) / 2)  # mean(-A * logp) = (2 - 2) / 2 = 0
    loss.backward()
    close(logp.grad, [[-1.0, 0.5]])  # -A / 2
    # surrogate at rho = 1 has the same gradient as A2C's loss
    logp2 = logp.detach().clone().requires_grad_(True)
    rl.surrogate_loss(logp2, logp.detach(), adv, torch.ones(1, 2)).backward()
    close(logp2.grad, logp.grad)

    # CG solves F x = b: F = [[4, 1], [1, 3]], b = [1, 2] -> x = [1/11, 7/11]
    F = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    x = rl.conjugate_gradient(lambda v: F @ v, torch.tensor([1.0, 2.0]), iters=2)
    close(x, [1 / 11, 7 / 11])
    # step scaled so that 0.5 step^T F step = max_kl
    step = rl.trpo_full_step(x, F @ x, max_kl=0.01)
    close(0.5 * step @ F @ step, 0.01)

    # line search: accepts the first fraction that lowers the loss within 1.5 max_kl
    tried = []

    def evaluate(frac):
        tried.append(frac)
        return (1.0 if frac > 0.3 else 0.5), 0.0

    assert rl.backtracking_line_search(evaluate, 0.9, 0.01) == 0.25
    assert tried == [1.0, 0.5, 0.25]
    assert rl.backtracking_line_search(lambda f: (2.0, 0.0), 0.9, 0.01, backtracks=3) == 0.0


def test_concat_rollouts_pads_prompts_and_joins_every_field():
    from rlhf_engine.rollout import Rollout, concat_rollouts

    def part(p_len, score, extra):
        return Rollout(torch.full((1, p_len), 5), torch.ones(1, p_len), torch.tensor([[7, 8]]), torch.ones(1, 2),
                       torch.tensor([True]), ["p"], ["r"], scores=torch.tensor([score]),
                       reward_parts={"a": torch.tensor([score])}, reward_extra={"x": extra})

    r = concat_rollouts([part(2, 1.0, 1.0), part(3, 2.0, 3.0)], pad_token_id=0)
    assert r.prompt_ids.tolist() == [[0, 5, 5], [5, 5, 5]] and r.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert r.scores.tolist() == [1.0, 2.0] and r.reward_parts["a"].tolist() == [1.0, 2.0]
    assert r.reward_extra == {"x": 2.0} and r.prompts == ["p", "p"] and r.logprobs is None


def test_nlpo_sampling_stays_in_the_mask_and_generation_logprobs_match_training():
    """Masked sampling (mask model = a perturbed copy of the actor, top-p 0.3) only emits allowed tokens,
    and the generation's log-probs equal the masked training forward's (the exact path's mismatch is 0)."""
    import copy

    from rlhf_engine.config import GenerationSection, ModelConfig
    from rlhf_engine.models import load_policy, load_tokenizer
    from rlhf_engine.rollout import forward_logprobs, generate

    cfg = ModelConfig(name_or_path="tiny-llama")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    actor = load_policy(cfg, for_training=False)
    mask_model = copy.deepcopy(actor)
    with torch.no_grad():
        for p in mask_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    enc = tokenizer(["Hello there", "Tell me about cats please"], return_tensors="pt", padding=True,
                    padding_side="left")
    gen = GenerationSection(max_new_tokens=6, temperature=0.8)
    allowed = []
    ids, mask, _, gen_lp = generate(actor, tokenizer, enc["input_ids"], enc["attention_mask"], gen,
                                    return_logprobs=True, mask_model=mask_model, mask_top_p=0.3, allowed_out=allowed)
    allowed = torch.cat(allowed)
    assert allowed.shape == (2, 6, actor.config.vocab_size)
    assert allowed.sum(-1).float().mean() < 0.5 * actor.config.vocab_size  # the mask does cut the vocabulary
    real = mask.bool()
    assert allowed.gather(-1, ids[..., None]).squeeze(-1)[real].all()  # every sampled token was allowed
    seq = torch.cat([enc["input_ids"], ids], 1)
    attn = torch.cat([enc["attention_mask"], mask.long()], 1)
    with torch.no_grad():
        train_lp = forward_logprobs(actor, seq, attn, 6, gen.temperature, allowed=allowed)
        full_lp = forward_logprobs(actor, seq, attn, 6, gen.temperature)
    close(gen_lp[real], train_lp[real], tol=1e-4)
    assert (train_lp[real] >= full_lp[real] - 1e-5).all()  # renormalised over fewer tokens: never less likely
