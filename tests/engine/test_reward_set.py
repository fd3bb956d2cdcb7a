"""References and meta from the data to every reward; reward lists (weights, names), metric rewards,
dense per-token rewards; the recipe keys that configure them."""
import json

import pytest
import torch

from rlhf_engine.config import DatasetConfig, ModelConfig, RecipeError, RewardConfig, load_recipe
from rlhf_engine.data import DataError, collate_prompts, load_prompts
from rlhf_engine.models import load_tokenizer
from rlhf_engine.reward_set import MetricReward, build_reward_set, dense_rewards
from rlhf_engine.rewards import build_reward


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(name_or_path="tiny-llama"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_carry_references_and_meta(tmp_path, tok):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "summary": "one ref", "info": {"k": 1}},
                                         {"prompt": "b", "summary": ["r1", "r2"], "info": None}])
    cfg = DatasetConfig(path=path, fields={"references": "summary", "meta": "info"}, shuffle=False)
    train, _, _ = load_prompts(cfg, tok, seed=0)
    batch = collate_prompts([train[0], train[1]], tok.pad_token_id)
    assert batch["references"] == [["one ref"], ["r1", "r2"]] and batch["meta"] == [{"k": 1}, None]
    # unmapped and absent: no references; mapped but missing in a row: an error naming the line
    plain = load_prompts(DatasetConfig(path=_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])), tok, 0)[0]
    assert plain[0]["references"] == [] and plain[0]["meta"] is None
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "summary": "x"}, {"prompt": "b", "summary": [1]}])
    with pytest.raises(DataError, match=r"bad.jsonl:line 2: field 'references' \(column 'summary'"):
        load_prompts(DatasetConfig(path=bad, fields={"references": "summary"}), tok, 0)


def test_callable_reward_receives_references_and_meta(tmp_path):
    (tmp_path / "my_reward.py").write_text(
        "def overlap(prompts, responses, references, meta, bonus=0.0):\n"
        "    return [float(r in refs) + bonus * m['w'] for r, refs, m in zip(responses, references, meta)]\n"
        "def texts_only(prompts, responses):\n    return [len(r) for r in responses]\n")
    fn = build_reward(RewardConfig(type="callable", function=f"{tmp_path}/my_reward.py:overlap", kwargs={"bonus": 1}))
    scores = fn(["p", "q"], ["yes", "no"], [["yes"], ["maybe"]], [{"w": 0.5}, {"w": 2.0}])
    assert scores.tolist() == [1.5, 2.0]
    old_style = build_reward(RewardConfig(type="callable", function=f"{tmp_path}/my_reward.py:texts_only"))
    assert old_style(["p"], ["abc"], [["x"]], [None]).tolist() == [3.0]


def test_weighted_list_logs_each_part(tok):
    cfgs = [RewardConfig(type="metric", metric="exact_match", weight=2.0),
            RewardConfig(type="length", name="len", kwargs={"unit": "words"}, weight=-0.5, scale=2.0)]
    rs = build_reward_set(cfgs, policy_tokenizer=tok)
    res = rs.score(["p", "q"], ["yes", "a b c"], [["yes"], ["no"]], [None, None])
    assert res.parts["exact_match"].tolist() == [1.0, 0.0]
    assert res.parts["len"].tolist() == [2.0, 6.0]  # scale applies inside the part, weight outside
    assert res.scores.tolist() == [2.0 * 1 - 0.5 * 2, 2.0 * 0 - 0.5 * 6] and res.dense is None
    assert rs(["p"], ["yes"], [["yes"]]).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"metric_key 'rougeX' is not a per-sample value of metric 'rouge'; it has"):
        MetricReward("rouge", "rougeX")
    for name in ("rouge", "bleu", "chrf", "diversity", "perplexity", "increasing_numbers", "dates", "exact_match"):
        metric = MetricReward(name).metric  # every declared key is what compute() returns
        res = metric.compute(["p"], ["1 2 on 2020-01-01"], [["1 2 3"]], ref_logprobs=[[-1.0]])
        assert set(metric.sample_keys()) == set(res.per_sample), name


def test_dense_rewards_sum_to_the_sentence_score(tok):
    fn = MetricReward("rouge", "rouge1")
    refs = [["the cat sat on the mat"], ["a dog"]]
    texts = ["the cat sat", "a big dog ran"]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    R = max(map(len, ids)) + 2
    response_ids = torch.full((2, R), tok.pad_token_id)
    mask = torch.zeros(2, R)
    for b, row in enumerate(ids):
        response_ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    per_token, final = dense_rewards(fn, ["p", "q"], response_ids, mask, tok, refs)
    sentence = fn(["p", "q"], texts, refs)
    assert torch.allclose(per_token.sum(1), sentence) and torch.allclose(final, sentence)
    assert (per_token[mask == 0] == 0).all() and (per_token[0, :len(ids[0])] > 0).all()  # each word adds overlap
    rs = build_reward_set([RewardConfig(type="metric", metric="rouge", metric_key="rouge1", dense=True, weight=3.0)],
                          policy_tokenizer=tok)
    res = rs.score(["p", "q"], texts, refs, None, response_ids=response_ids, response_mask=mask)
    assert torch.allclose(res.dense, 3 * per_token) and torch.allclose(res.scores, 3 * sentence)


RECIPE = """
name: t
stage: rl
model: {name_or_path: tiny-llama}
data: {path: prompts.jsonl}
train: {steps: 1}
reward: %s
"""


@pytest.mark.parametrize("reward, error", [
    ("[{type: length}, {type: length}]", "several rewards are named \\['length'\\]"),
    ("{type: remote}", "needs reward.url"),
    ("{type: metric}", "needs reward.metric"),
    ("{type: length, metric: rouge}", "only read by reward.type 'metric'"),
    ("{type: remote, url: 'http://x', dense: true}", "scores whole responses only"),
    ("[]", "an empty list"),
    ("{type: length}\neval: {test_data: {path: t.jsonl, eval_size: 2}}", "every row of the test split"),
    ("{type: length}\neval: {generation: {dtype: bf16}}", "set them in `generation`"),
])
def test_reward_recipe_errors(tmp_path, reward, error):
    (tmp_path / "r.yaml").write_text(RECIPE % reward)
    with pytest.raises(RecipeError, match=error):
        load_recipe(tmp_path / "r.yaml")


def test_reward_list_and_eval_section_load(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE % "[{type: length, weight: 0.5}, {type: metric, metric: rouge}]"
                                     + "eval: {metrics: [rouge, {name: bleu}], generation: {do_sample: false}}\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert [r.label for r in recipe.reward_configs()] == ["length", "rouge"]
    assert [m.name for m in recipe.eval.metric_configs()] == ["rouge", "bleu"]
    assert recipe.eval.generation.do_sample is False


def test_rollouts_keep_reward_parts_through_select_and_concat():
    """DAPO's dynamic sampling selects prompt groups and concatenates rollouts: each reward's values follow."""
    from rlhf_engine.rollout import Rollout, concat_rollouts

    def rollout(offset):
        ids = torch.arange(4).view(2, 2) + offset
        return Rollout(ids, torch.ones(2, 2), ids, torch.ones(2, 2), torch.ones(2, dtype=torch.bool), ["a", "b"],
                       ["x", "y"], scores=torch.tensor([1.0, 2.0]) + offset, references=[["r"], []], meta=[1, 2],
                       reward_parts={"rouge": torch.tensor([0.1, 0.2]) + offset}, reward_extra={"judge/hits": offset})

    both = concat_rollouts([rollout(0).select(torch.tensor([1])), rollout(10)], pad_token_id=0)
    assert both.reward_parts["rouge"].tolist() == pytest.approx([0.2, 10.1, 10.2])
    assert both.references == [[], ["r"], []] and both.meta == [2, 1, 2]
    assert both.reward_extra == {"judge/hits": 5.0}
