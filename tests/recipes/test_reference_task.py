"""A task with references end to end on 2 ranks: ROUGE + dense ROUGE-1 + a remote reward (a real HTTP
server in this test process) as one weighted reward, greedy evaluation with metrics, a test split
before and after training, and predictions files."""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf_engine.tracking import read_jsonl
from helpers import REPO, run_deepspeed, send_json

RECIPE = "recipes/tiny/ppo-data2text.yaml"


class Judge(BaseHTTPRequestHandler):
    """An OpenRLHF-style reward server: 1 when the label's first word is in the query."""

    labels: list = []

    def do_POST(self):  # noqa: N802
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.labels.extend(data["labels"])
        rewards = [float(lab.split()[0] in q) for q, lab in zip(data["query"], data["labels"])]
        send_json(self, {"rewards": rewards, "extra_logs": {"hits": rewards}})

    def log_message(self, *args):
        pass


def test_reference_task_with_metrics_remote_reward_and_test_split(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    rewards = ("[{type: metric, metric: rouge, metric_key: rougeL}, {type: metric, name: dense, metric: rouge, "
               f"metric_key: rouge1, dense: true, weight: 0.5}}, {{type: remote, name: judge, url: '{url}', weight: 0.2}}]")
    try:
        run_deepspeed("launch/train.py", RECIPE, f"--set=output_dir={tmp_path}", "--set=name=d2t",
                      "--set=train.steps=1", "--set=logging.plots=true", f"--set=reward={rewards}")
    finally:
        server.shutdown()
        server.server_close()
    run = tmp_path / "d2t"
    metrics = read_jsonl(run / "metrics.jsonl")
    for key in ("reward/rouge", "reward/dense", "reward/judge", "reward/judge/hits", "score/mean"):
        assert key in metrics[0] and math.isfinite(metrics[0][key]), (key, metrics[0])
    assert (run / "plots" / "reward_parts.png").is_file()  # every reward's curve in one figure
    report = (run / "report.md").read_text()  # the run report tabulates every evaluation metric per split
    assert "| test | rouge/rougeL |" in report and "| eval | reward/judge |" in report
    # the server's labels are the first references of the rows (train and test split)
    firsts = {json.loads(line)["references"][0] for split in ("train", "test")
              for line in (REPO / f"recipes/data/data2text-{split}.jsonl").open()}
    assert Judge.labels and set(Judge.labels) <= firsts
    evals = read_jsonl(run / "eval.jsonl")
    assert [(e["step"], e.get("split", "eval")) for e in evals] == [(0, "eval"), (0, "test"), (1, "eval"), (1, "test")]
    for e in evals:
        for key in ("rouge/rougeL", "bleu/bleu", "diversity/distinct-1", "diversity/vocab_size", "reward/judge"):
            assert e[key] is not None and e[key] >= 0, (key, e)
        assert e["perplexity/perplexity"] > 1
    test_rows = [json.loads(line) for line in (REPO / "recipes/data/data2text-test.jsonl").open()][:4]
    predictions = [json.loads(line) for line in (run / "predictions" / "test-step-1.jsonl").open()]
    assert sorted(p["references"][0] for p in predictions) == sorted(r["references"][0] for r in test_rows)
    for p in predictions:
        assert {"prompt", "response", "meta", "score", "rouge/rougeL", "perplexity/perplexity"} <= set(p)
        assert p["meta"]["name"] in p["prompt"]
