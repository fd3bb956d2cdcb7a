"""engine/rewards.py: built-in judges, user callables, and the checks that stop a run on a bad reward."""
import textwrap

import pytest
import torch

from rlhf_engine.config import RewardConfig
from rlhf_engine.rewards import RewardError, build_reward, check_scores

PROMPTS = ["How is your day?", "Tell me about the weather."]


def test_sentiment_prefers_positive_text_and_scale_multiplies():
    reward = build_reward(RewardConfig(type="sentiment"))
    scores = reward(PROMPTS, ["I love this wonderful day!", "This is terrible and I hate it."])
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    assert scores[0] > 0.5 and scores[1] < -0.5  # VADER compound in [-1, 1]
    scaled = build_reward(RewardConfig(type="sentiment", scale=2.0))(PROMPTS, ["I love this wonderful day!", "meh"])
    assert scaled[0].item() == pytest.approx(2 * scores[0].item())
    with pytest.raises(ValueError, match=r"reward.kwargs \['target'\] are not used by reward.type 'sentiment'"):
        build_reward(RewardConfig(type="sentiment", kwargs={"target": 3}))


def test_length_with_and_without_target():
    responses = ["one two three four", "one", ""]
    plain = build_reward(RewardConfig(type="length"))(["p"] * 3, responses)
    assert plain.tolist() == [4.0, 1.0, 0.0]
    # -|len - 4| / 4
    target = build_reward(RewardConfig(type="length", kwargs={"target": 4}))(["p"] * 3, responses)
    assert target.tolist() == pytest.approx([0.0, -0.75, -1.0])
    chars = build_reward(RewardConfig(type="length", kwargs={"unit": "chars"}))(["p"], ["abc de"])
    assert chars.tolist() == [6.0]
    with pytest.raises(ValueError, match="needs the policy tokenizer"):
        build_reward(RewardConfig(type="length", kwargs={"unit": "tokens"}))


def _write(path, source):
    path.write_text(textwrap.dedent(source))
    return path


def test_callable_from_module_and_from_file(tmp_path, monkeypatch):
    _write(tmp_path / "my_rewards.py", """
        def count_a(prompts, responses, weight=1.0):
            return [weight * r.count("a") for r in responses]
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward(RewardConfig(type="callable", function="my_rewards:count_a", kwargs={"weight": 0.5}))
    assert reward(PROMPTS, ["banana", "xyz"]).tolist() == [1.5, 0.0]

    (tmp_path / "sub").mkdir()
    path = _write(tmp_path / "sub" / "judge.py", """
        import torch
        def prompt_len(prompts, responses):
            return torch.tensor([float(len(p)) for p in prompts])
    """)
    reward = build_reward(RewardConfig(type="callable", function=f"{path}:prompt_len"))
    assert reward(PROMPTS, ["a", "b"]).tolist() == [16.0, 26.0]


def test_bad_function_spec_gives_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"reward.function 'no_such_module_xyz:f': cannot import"):
        build_reward(RewardConfig(type="callable", function="no_such_module_xyz:f"))
    _write(tmp_path / "has_other.py", "def other(p, r):\n    return [0.0] * len(r)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"has no function 'missing'; callables there: other"):
        build_reward(RewardConfig(type="callable", function="has_other:missing"))
    with pytest.raises(ValueError, match="cannot import.*no file"):
        build_reward(RewardConfig(type="callable", function=f"{tmp_path}/absent.py:f"))


def test_nan_exception_and_wrong_count_stop_with_reward_error(tmp_path):
    path = _write(tmp_path / "flaky.py", """
        def nan_on_second(prompts, responses):
            return [float("nan") if "bad" in r else 1.0 for r in responses]
        def raise_on_bad(prompts, responses):
            for r in responses:
                if "bad" in r:
                    raise KeyError("no score for this one")
            return [1.0] * len(responses)
        def too_few(prompts, responses):
            return [1.0]
    """)
    prompts = ["first prompt", "second prompt " + "x" * 500]
    responses = ["fine answer", "a bad answer"]

    with pytest.raises(RewardError) as err:
        build_reward(RewardConfig(type="callable", function=f"{path}:nan_on_second"))(prompts, responses)
    msg = str(err.value)
    assert f"callable {path}:nan_on_second" in msg and "returned nan for sample 1" in msg
    assert "'a bad answer'" in msg and "second prompt" in msg and "x" * 500 not in msg  # truncated

    with pytest.raises(RewardError) as err:
        build_reward(RewardConfig(type="callable", function=f"{path}:raise_on_bad"))(prompts, responses)
    msg = str(err.value)
    assert "raise_on_bad' raised KeyError" in msg and "failing sample 1" in msg and "'a bad answer'" in msg
    assert isinstance(err.value.__cause__, KeyError)  # chained: the user's traceback is kept

    with pytest.raises(RewardError, match=r"returned \(1,\) scores for 2 responses"):
        build_reward(RewardConfig(type="callable", function=f"{path}:too_few"))(prompts, responses)


def test_check_scores_accepts_lists_and_tensors():
    out = check_scores([1, 2.5], "demo", ["p", "q"], ["r", "s"])
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 2.5]
    with pytest.raises(RewardError, match=r"reward 'demo' returned inf for sample 0"):
        check_scores(torch.tensor([float("inf"), 0.0]), "demo", ["p", "q"], ["r", "s"])


def test_model_reward_scores_text_and_token_ids_alike():
    """tiny-bert RM (MiniLM vocabulary) under a tiny-llama policy (SmolLM2 vocabulary): re-tokenized path."""
    from rlhf_engine.config import ModelConfig
    from rlhf_engine.models import load_tokenizer

    policy_tok = load_tokenizer(ModelConfig(name_or_path="tiny-llama"))
    cfg = RewardConfig(type="model", model=ModelConfig(name_or_path="tiny-bert"), scale=3.0)
    reward = build_reward(cfg, policy_tokenizer=policy_tok)
    assert not reward.same_tokenizer and reward.name == "model tiny-bert"
    prompts, responses = ["Hello there. ", "What is two plus two? "], ["I love this wonderful day!", "Four."]
    text_scores = reward(prompts, responses)
    assert text_scores.shape == (2,) and torch.isfinite(text_scores).all() and text_scores[0] != text_scores[1]
    unscaled = build_reward(cfg.model_copy(update={"scale": 1.0}), policy_tokenizer=policy_tok)(prompts, responses)
    torch.testing.assert_close(text_scores, 3.0 * unscaled)  # same head on every load (seeded)

    enc = policy_tok([p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True,
                     add_special_tokens=False)
    torch.testing.assert_close(reward.score_tokens(enc["input_ids"], enc["attention_mask"], prompts=prompts,
                                                   responses=responses), text_scores)
    # without the texts, the policy ids are decoded and re-tokenized: same text, same scores
    torch.testing.assert_close(reward.score_tokens(enc["input_ids"], enc["attention_mask"]), text_scores)

    # shared vocabulary: the ids go straight to the model
    direct = build_reward(cfg, policy_tokenizer=reward.tokenizer)
    assert direct.same_tokenizer
    ids, mask = direct._tokenize([p + r for p, r in zip(prompts, responses)])
    torch.testing.assert_close(direct.score_tokens(ids, mask), text_scores)

    # a model that returns NaN stops the run with the sample named
    direct.model._head().weight.data.fill_(float("nan"))
    with pytest.raises(RewardError, match=r"reward 'model tiny-bert' returned nan for sample 0: .*'I love this"):
        direct.score_tokens(ids, mask, prompts=prompts, responses=responses)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_reward_sharing_the_reference_backbone_scores_exactly_as_its_own_copy(dtype):
    """TRL's workload builds the reward model and the reference from the same weights: one forward serves both."""
    from rlhf_engine.config import ModelConfig
    from rlhf_engine.models import load_policy, load_tokenizer
    from rlhf_engine.rollout import forward_logprobs

    model_cfg = ModelConfig(name_or_path="tiny-llama", dtype=dtype)
    tok = load_tokenizer(model_cfg)
    reference = load_policy(model_cfg, for_training=False)
    enc = tok(["Hello there, how are you today?", "Four."], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def build():
        return build_reward(RewardConfig(type="model", model=model_cfg, scale=2.0), policy_tokenizer=tok)

    reward = build()
    own_scores = reward.score_tokens(ids, mask)
    own_backbone = reward.model.hf_model.model
    assert reward.share_backbone(reference) and reward.shared_backbone
    assert reward.model.hf_model.model is reference.model and own_backbone is not reference.model
    hidden = []
    with torch.no_grad():
        ref_lp = forward_logprobs(reference, ids, mask, 3, hidden_out=hidden)
        torch.testing.assert_close(ref_lp, forward_logprobs(reference, ids, mask, 3), rtol=0, atol=0)
    assert len(hidden) == 1 and hidden[0].shape == (*ids.shape, reference.config.hidden_size)
    shared_scores = reward.score_hidden(hidden[0], ids, mask)
    torch.testing.assert_close(shared_scores, own_scores, rtol=0, atol=0)
    torch.testing.assert_close(reward.score_tokens(ids, mask), own_scores, rtol=0, atol=0)  # .model still works

    # any difference in the weights (or their dtype) keeps the reward model's own copy
    other = build()
    with torch.no_grad():
        other.model.hf_model.model.norm.weight[0] += 0.5  # visible in bf16 too
    assert not other.share_backbone(reference) and not other.shared_backbone
    cast = build_reward(RewardConfig(type="model", model=model_cfg.model_copy(
        update={"dtype": "bf16" if dtype == "fp32" else "fp32"})), policy_tokenizer=tok)
    assert not cast.share_backbone(reference)
