"""Evaluation metrics of generated texts, on the field's own libraries; every metric is also a reward.

``get_metric(name, **kwargs).compute(prompts, responses, references, meta, **context) -> MetricResult``:
``corpus`` {key: float} (the library's corpus-level number where it has one, else the mean) and
``per_sample`` {key: [float] * B}. ``references`` is one list of strings per sample (may be empty
for reference-free metrics). ``context`` carries what some metrics need besides texts: ``ref_logprobs``
(per sample, the reference model's log-probs of the response tokens) for perplexity.

Libraries: rouge-score (ROUGE), sacrebleu (BLEU, chrF), nltk (METEOR, with WordNet 3.0 read from the
Debian package `wordnet-base`, since nltk's own data downloader needs the network), bert-score
(BERTScore on a local backbone, default the embedded MiniLM). BLEURT and SPICE are not offered: BLEURT
needs its checkpoints from the hub, SPICE a Java runtime and Stanford CoreNLP models fetched at run time.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

METRICS: dict[str, type["Metric"]] = {}


def register_metric(cls):
    METRICS[cls.name] = cls
    return cls


@dataclass
class MetricResult:
    corpus: dict[str, float] = field(default_factory=dict)
    per_sample: dict[str, list[float]] = field(default_factory=dict)


class Metric:
    """Base: ``name`` (registry key), ``main`` (the per-sample key used as a reward by default),
    ``needs_references``."""

    name = "metric"
    main = ""
    needs_references = True

    def compute(self, prompts: list[str], responses: list[str], references: list[list[str]],
                meta: Optional[list] = None, **context) -> MetricResult:
        raise NotImplementedError

    def sample_keys(self) -> tuple[str, ...]:
        """The keys of ``per_sample`` (what a metric reward may pick with reward.metric_key)."""
        return (self.main,)

    def check_references(self, references: list[list[str]], n: int) -> None:
        if not self.needs_references:
            return
        if references is None or len(references) != n or any(not refs for refs in references):
            missing = n if references is None else sum(1 for refs in references if not refs)
            raise ValueError(f"metric '{self.name}' compares responses with references, but {missing} of {n} samples "
                             "have none; give the dataset a 'references' column (or map one with data.fields)")


def get_metric(name: str, **kwargs) -> Metric:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(sorted(METRICS))}")
    try:
        return METRICS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"metric '{name}': bad kwargs {sorted(kwargs)} ({e})") from None


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


# --------------------------------------------------------------------------------------------
@register_metric
class Rouge(Metric):
    """ROUGE F-measures (rouge-score); several references: the best one per sample (rouge-score's
    ``score_multi``). Corpus value = mean of the per-sample F-measures (as HF evaluate reports)."""

    name, main = "rouge", "rougeL"

    def __init__(self, rouge_types: tuple = ("rouge1", "rouge2", "rougeL", "rougeLsum"), use_stemmer: bool = True):
        from rouge_score import rouge_scorer

        self.types = list(rouge_types)
        self.scorer = rouge_scorer.RougeScorer(self.types, use_stemmer=use_stemmer)

    def sample_keys(self):
        return tuple(self.types)

    def compute(self, prompts, responses, references, meta=None, **context):
        self.check_references(references, len(responses))
        per = {t: [] for t in self.types}
        for hyp, refs in zip(responses, references):
            scores = self.scorer.score_multi(refs, hyp)
            for t in self.types:
                per[t].append(scores[t].fmeasure)
        return MetricResult({t: _mean(v) for t, v in per.items()}, per)


def _ref_streams(references: list[list[str]]) -> list[list[Optional[str]]]:
    """sacrebleu's reference streams (one list per reference index); samples with fewer references
    get None there, which sacrebleu skips."""
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


@register_metric
class Bleu(Metric):
    """SacreBLEU BLEU (0-100): corpus BLEU over all samples, sentence BLEU per sample."""

    name, main = "bleu", "bleu"

    def __init__(self, **bleu_kwargs):
        from sacrebleu.metrics import BLEU

        self.corpus_metric = BLEU(**bleu_kwargs)
        self.sentence_metric = BLEU(**{**bleu_kwargs, "effective_order": True})

    def compute(self, prompts, responses, references, meta=None, **context):
        self.check_references(references, len(responses))
        corpus = self.corpus_metric.corpus_score(responses, _ref_streams(references)).score
        per = [self.sentence_metric.sentence_score(h, refs).score for h, refs in zip(responses, references)]
        return MetricResult({"bleu": corpus}, {"bleu": per})


@register_metric
class ChrF(Metric):
    """SacreBLEU chrF (0-100; ``word_order=2`` gives chrF++)."""

    name, main = "chrf", "chrf"

    def __init__(self, **chrf_kwargs):
        from sacrebleu.metrics import CHRF

        self.metric = CHRF(**chrf_kwargs)

    def compute(self, prompts, responses, references, meta=None, **context):
        self.check_references(references, len(responses))
        corpus = self.metric.corpus_score(responses, _ref_streams(references)).score
        per = [self.metric.sentence_score(h, refs).score for h, refs in zip(responses, references)]
        return MetricResult({"chrf": corpus}, {"chrf": per})


# --------------------------------------------------------------------------------------------
WORDNET_SYSTEM = Path(os.environ.get("RLHF_ENGINE_WORDNET", "/usr/share/wordnet"))  # Debian: apt-get install wordnet-base
# nltk's reader wants lexnames (the 45 lexicographer files of WordNet 3.0), which the Debian package lacks
_LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
             "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
             "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
             "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
             "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
             "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
             "adj.ppl").split()
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def load_wordnet(cache_dir: Optional[str] = None):
    """nltk's WordNet 3.0 reader over the system's WordNet database, copied once into our cache
    (nltk reads corpora only below its data path)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    from rlhf_engine.presets import cache_root, cached_folder

    if not (WORDNET_SYSTEM / "data.noun").is_file():
        raise ValueError(f"metric 'meteor' needs WordNet 3.0 and found none in {WORDNET_SYSTEM}: install it with "
                         "`apt-get install wordnet-base` (or point $RLHF_ENGINE_WORDNET to a WordNet 'dict' folder)")

    def build(out: Path):
        target = out / "corpora" / "wordnet"
        target.mkdir(parents=True)
        for f in WORDNET_SYSTEM.iterdir():
            if f.is_file():
                shutil.copy(f, target / f.name)
        (target / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{_POS_NUMBER[n.split('.')[0]]}\n"
                                                 for i, n in enumerate(_LEXNAMES)))

    root = cached_folder(cache_root(cache_dir), "nltk-wordnet", build, "WordNet 3.0 for nltk (METEOR)")
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))

    class _EnglishWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):  # no version mapping: English WordNet 3.0 only (no OMW)
            return None

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": we use English only
        return _EnglishWordNet(str(root / "corpora" / "wordnet"), None)


@register_metric
class Meteor(Metric):
    """METEOR (nltk's ``meteor_score``: exact, Porter-stem and WordNet-synonym matches; best reference).
    Texts are lower-cased and split on whitespace and punctuation (nltk's punkt data is not offline)."""

    name, main = "meteor", "meteor"

    def __init__(self, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5, cache_dir: Optional[str] = None):
        self.wordnet = load_wordnet(cache_dir)
        self.params = dict(alpha=alpha, beta=beta, gamma=gamma)

    @staticmethod
    def tokens(text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text.lower())

    def compute(self, prompts, responses, references, meta=None, **context):
        from nltk.translate.meteor_score import meteor_score

        self.check_references(references, len(responses))
        per = [meteor_score([self.tokens(r) for r in refs], self.tokens(h), wordnet=self.wordnet, **self.params)
               for h, refs in zip(responses, references)]
        return MetricResult({"meteor": _mean(per)}, {"meteor": per})


@register_metric
class BertScore(Metric):
    """BERTScore precision / recall / F1 (bert-score) with a local backbone: a preset name (default the
    embedded ``minilm-l6``) or a local folder; ``num_layers`` defaults to all of the backbone's layers."""

    name, main = "bertscore", "f1"

    def __init__(self, model: str = "minilm-l6", num_layers: Optional[int] = None, batch_size: int = 32,
                 idf: bool = False, cache_dir: Optional[str] = None):
        from bert_score import BERTScorer
        from transformers import AutoConfig

        from rlhf_engine.presets import PRESETS, cache_root

        path = str(PRESETS[model].materialize(cache_root(cache_dir))) if model in PRESETS else model
        if not Path(path).is_dir():
            raise ValueError(f"metric 'bertscore': model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                             "local folder (no hub downloads)")
        layers = num_layers or AutoConfig.from_pretrained(path).num_hidden_layers
        self.scorer = BERTScorer(model_type=path, num_layers=layers, batch_size=batch_size, idf=idf)

    def sample_keys(self):
        return ("precision", "recall", "f1")

    def compute(self, prompts, responses, references, meta=None, **context):
        self.check_references(references, len(responses))
        p, r, f = self.scorer.score(list(responses), [list(refs) for refs in references])
        per = {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist()}
        return MetricResult({k: _mean(v) for k, v in per.items()}, per)


# --------------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return text.split()


def _ngrams(words: list[str], n: int) -> list[tuple]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


@register_metric
class Diversity(Metric):
    """Lexical diversity over whitespace words: distinct-n (unique n-grams / all n-grams, corpus and per
    sample), unique-n (count of unique n-grams in the corpus), vocabulary size, mean length in words."""

    name, main = "diversity", "distinct-2"
    needs_references = False

    def __init__(self, max_n: int = 2):
        self.max_n = max_n

    def sample_keys(self):
        return ("length", *(f"distinct-{n}" for n in range(1, self.max_n + 1)))

    def compute(self, prompts, responses, references=None, meta=None, **context):
        words = [_words(r) for r in responses]
        corpus: dict[str, float] = {"vocab_size": float(len({w for ws in words for w in ws})),
                                    "mean_length": _mean([float(len(ws)) for ws in words])}
        per: dict[str, list[float]] = {"length": [float(len(ws)) for ws in words]}
        for n in range(1, self.max_n + 1):
            grams = [_ngrams(ws, n) for ws in words]
            every = [g for gs in grams for g in gs]
            corpus[f"unique-{n}"] = float(len(set(every)))
            corpus[f"distinct-{n}"] = len(set(every)) / len(every) if every else 0.0
            per[f"distinct-{n}"] = [len(set(gs)) / len(gs) if gs else 0.0 for gs in grams]
        return MetricResult(corpus, per)


@register_metric
class Perplexity(Metric):
    """Perplexity of the responses under the reference model: per sample exp(-mean token log-prob),
    corpus exp(-all log-probs / all tokens). Needs ``ref_logprobs`` (the evaluation supplies them)."""

    name, main = "perplexity", "perplexity"
    needs_references = False

    def compute(self, prompts, responses, references=None, meta=None, *, ref_logprobs=None, **context):
        if ref_logprobs is None:
            raise ValueError("metric 'perplexity' needs the reference model's token log-probs (ref_logprobs); "
                             "it runs at evaluation, not as a reward")
        per = [math.exp(-sum(lp) / len(lp)) if len(lp) else float("nan") for lp in ref_logprobs]
        total = sum(len(lp) for lp in ref_logprobs)
        corpus = math.exp(-sum(sum(lp) for lp in ref_logprobs) / total) if total else float("nan")
        return MetricResult({"perplexity": corpus}, {"perplexity": per})


# --------------------------------------------------------------------------------------------
# RL4LMs' synthetic tasks (reference-free)
def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


@register_metric
class IncreasingNumbers(Metric):
    """RL4LMs' synthetic task: the length of the leading strictly increasing run of numbers among the
    response's whitespace tokens, divided by max(number of tokens, min_tokens / 2); 0 without numbers."""

    name, main = "increasing_numbers", "increasing_numbers"
    needs_references = False

    def __init__(self, min_tokens: int = 20):
        self.min_tokens = min_tokens

    def score(self, text: str) -> float:
        tokens = text.split()
        numbers = [float(t) for t in tokens if _is_number(t)]
        if not numbers:
            return 0.0
        run = 1
        for prev, cur in zip(numbers, numbers[1:]):
            if cur <= prev:
                break
            run += 1
        return run / max(len(tokens), self.min_tokens / 2)

    def compute(self, prompts, responses, references=None, meta=None, **context):
        per = [self.score(r) for r in responses]
        return MetricResult({self.main: _mean(per)}, {self.main: per})


@register_metric
class Dates(Metric):
    """RL4LMs' synthetic task: 1 when the response contains a date written YYYY-MM-DD, else 0."""

    name, main = "dates", "dates"
    needs_references = False
    PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")

    def compute(self, prompts, responses, references=None, meta=None, **context):
        per = [1.0 if self.PATTERN.search(r) else 0.0 for r in responses]
        return MetricResult({self.main: _mean(per)}, {self.main: per})


@register_metric
class ExactMatch(Metric):
    """1 when the stripped response equals one of the stripped references, else 0."""

    name, main = "exact_match", "exact_match"

    def compute(self, prompts, responses, references, meta=None, **context):
        self.check_references(references, len(responses))
        per = [1.0 if r.strip() in {t.strip() for t in refs} else 0.0 for r, refs in zip(responses, references)]
        return MetricResult({self.main: _mean(per)}, {self.main: per})


def compute_metrics(metrics: dict[str, Metric], prompts, responses, references, meta=None,
                    **context) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Every metric -> (corpus {"<metric>/<key>": float}, per sample {"<metric>/<key>": [float] * B})."""
    corpus, per = {}, {}
    for label, metric in metrics.items():
        res = metric.compute(prompts, responses, references, meta, **context)
        corpus.update({f"{label}/{k}": v for k, v in res.corpus.items()})
        per.update({f"{label}/{k}": v for k, v in res.per_sample.items()})
    return corpus, per

