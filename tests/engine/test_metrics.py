"""engine/metrics.py: every metric against its library's own output (or a hand count) on fixed texts."""
import math

import pytest

from rlhf_engine.metrics import METRICS, WORDNET_SYSTEM, compute_metrics, get_metric

PROMPTS = ["p1", "p2", "p3"]
HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the dog", "it rained on 2021-01-05 all day"]
REFS = [["the cat is on the mat"], ["the quick brown fox jumped over the lazy dog", "a fast fox leaps"],
        ["it was raining all day"]]


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    res = get_metric("rouge").compute(PROMPTS, HYPS, REFS)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = [scorer.score_multi(r, h)[key].fmeasure for h, r in zip(HYPS, REFS)]
        assert res.per_sample[key] == pytest.approx(expected)
        assert res.corpus[key] == pytest.approx(sum(expected) / 3)
    # several references: the best one counts (sample 2 matches its first reference much better)
    only_first = scorer.score(REFS[1][0], HYPS[1])["rougeL"].fmeasure
    assert res.per_sample["rougeL"][1] == pytest.approx(only_first) and 0.5 < only_first < 1


def test_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu

    res = get_metric("bleu").compute(PROMPTS, HYPS, REFS)
    # sacrebleu's own corpus call with reference streams (None where a sample has fewer references)
    streams = [[r[0] for r in REFS], [r[1] if len(r) > 1 else None for r in REFS]]
    assert res.corpus["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score)
    assert res.per_sample["bleu"] == pytest.approx([sacrebleu.sentence_bleu(h, r).score for h, r in zip(HYPS, REFS)])
    chrf = get_metric("chrf").compute(PROMPTS, HYPS, REFS)
    assert chrf.corpus["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score)
    assert chrf.per_sample["chrf"] == pytest.approx([sacrebleu.sentence_chrf(h, r).score for h, r in zip(HYPS, REFS)])


@pytest.mark.skipif(not (WORDNET_SYSTEM / "data.noun").is_file(), reason="WordNet not installed (apt-get install wordnet-base)")
def test_meteor_equals_nltk_and_uses_synonyms():
    from nltk.translate.meteor_score import meteor_score

    metric = get_metric("meteor")
    res = metric.compute(PROMPTS, HYPS, REFS)
    tok = metric.tokens  # lower-cased words and punctuation marks
    expected = [meteor_score([tok(r) for r in refs], tok(h), wordnet=metric.wordnet) for h, refs in zip(HYPS, REFS)]
    assert res.per_sample["meteor"] == pytest.approx(expected)
    # a WordNet synonym (sofa ~ couch) scores above an unrelated word
    syn = metric.compute(["p"] * 2, ["the dog lay on the couch", "the dog lay on the table"],
                         [["the dog lay on the sofa"]] * 2).per_sample["meteor"]
    assert syn[0] > syn[1]


def test_bertscore_equals_bert_score_on_the_embedded_minilm():
    from bert_score import score

    from rlhf_engine.presets import PRESETS, cache_root

    res = get_metric("bertscore", model="minilm-l6").compute(PROMPTS, HYPS, REFS)
    path = str(PRESETS["minilm-l6"].materialize(cache_root()))
    p, r, f = score(HYPS, REFS, model_type=path, num_layers=6)
    assert res.per_sample["f1"] == pytest.approx(f.tolist(), abs=1e-5)
    assert res.corpus["precision"] == pytest.approx(p.mean().item(), abs=1e-5)
    assert res.per_sample["f1"][0] > res.per_sample["f1"][2]  # near-copy beats a paraphrase
    with pytest.raises(ValueError, match="neither a preset"):
        get_metric("bertscore", model="no/such-model")


def test_diversity_perplexity_and_synthetic_tasks_by_hand():
    texts = ["a b a b", "a c", ""]
    d = get_metric("diversity").compute(["p"] * 3, texts)
    # unigrams: a b a b a c -> 3 unique of 6; bigrams: ab ba ab ac -> 3 unique of 4
    assert d.corpus == pytest.approx({"vocab_size": 3, "mean_length": 2.0, "unique-1": 3, "distinct-1": 0.5,
                                      "unique-2": 3, "distinct-2": 0.75})
    assert d.per_sample["distinct-1"] == [0.5, 1.0, 0.0]
    lp = [[-1.0, -2.0], [-0.5]]
    ppl = get_metric("perplexity").compute(["p"] * 2, ["x", "y"], ref_logprobs=lp)
    assert ppl.per_sample["perplexity"] == pytest.approx([math.exp(1.5), math.exp(0.5)])
    assert ppl.corpus["perplexity"] == pytest.approx(math.exp(3.5 / 3))
    with pytest.raises(ValueError, match="needs the reference model's token log-probs"):
        get_metric("perplexity").compute(["p"], ["x"])
    inc = get_metric("increasing_numbers", min_tokens=20).compute(["p"] * 3, ["1 2 3 2 5", "no numbers", "4 5 x"])
    assert inc.per_sample["increasing_numbers"] == pytest.approx([3 / 10, 0.0, 2 / 10])
    dates = get_metric("dates").compute(["p"] * 2, ["see you on 2024-05-01", "see you in May"])
    assert dates.per_sample["dates"] == [1.0, 0.0]


def test_registry_errors_and_prefixed_keys():
    assert {"rouge", "bleu", "chrf", "meteor", "bertscore", "diversity", "perplexity", "increasing_numbers",
            "dates", "exact_match"} <= set(METRICS)
    with pytest.raises(ValueError, match="unknown metric 'blue'; available"):
        get_metric("blue")
    with pytest.raises(ValueError, match="2 of 2 samples have none"):
        get_metric("rouge").compute(["p", "q"], ["a", "b"], [[], []])
    corpus, per = compute_metrics({"exact_match": get_metric("exact_match")}, ["p"] * 2, [" yes", "no"],
                                  [["yes"], ["maybe"]])
    assert corpus == {"exact_match/exact_match": 0.5} and per == {"exact_match/exact_match": [1.0, 0.0]}
