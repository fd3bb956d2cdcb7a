"""Remote rewards over real HTTP servers on localhost: our client against our server (serve-reward, in
a thread and as the CLI process) and against plain stdlib servers that time out, fail, or miscount."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf_engine.config import RemoteRewardSection, RewardConfig
from rlhf_engine.remote_reward import RemoteReward, RemoteRewardError, make_server
from rlhf_engine.reward_set import build_reward_set
from helpers import REPO, TEST_ENV, free_port, send_json

FAST = RemoteRewardSection(batch_size=2, max_concurrency=3, timeout_s=1.0, retries=2, backoff_s=0.01)


def _serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.server_address[1]}/reward"


@pytest.fixture
def ours():
    reward = build_reward_set([RewardConfig(type="metric", metric="exact_match", name="exact"),
                               RewardConfig(type="length", kwargs={"unit": "chars"}, weight=0.1)])
    server = make_server(reward, "127.0.0.1", 0)
    yield _serve(server)
    server.shutdown()
    server.server_close()


class Scripted(BaseHTTPRequestHandler):
    """A stand-in for someone else's OpenRLHF reward server; `plan` says what each request gets."""

    plan: list = []
    requests: list = []

    def do_POST(self):  # noqa: N802
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(data)
        action = type(self).plan.pop(0) if type(self).plan else "ok"
        if action == "sleep":
            time.sleep(3)
            return
        if action in (500, 404):
            self.send_response(action)
            self.end_headers()
            self.wfile.write(b"server says no")
            return
        n = len(data["query"]) - (1 if action == "short" else 0)
        send_json(self, {"rewards": [float(len(q)) for q in data["query"][:n]],
                         "extra_logs": {"n_chars": [float(len(q)) for q in data["query"][:n]]}})

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    handler = type("H", (Scripted,), {"plan": [], "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    yield _serve(server), handler
    server.shutdown()
    server.server_close()


def test_our_client_and_server_speak_openrlhf(ours):
    client = RemoteReward(ours, FAST)
    prompts, responses = ["Q1 ", "Q2 ", "Q3 ", "Q4 ", "Q5 "], ["yes", "no", "maybe", "yes", "x"]
    refs = [["yes"], ["yes"], ["maybe"], ["no"], ["x"]]
    scores = client(prompts, responses, refs)
    # exact match against the label (first reference) + 0.1 x response characters (prompt split off)
    expected = [1 + 0.3, 0 + 0.2, 1 + 0.5, 0 + 0.3, 1 + 0.1]
    assert scores.tolist() == pytest.approx(expected)
    assert client.last_extra_logs == pytest.approx({"exact": 0.6, "length": 2.8})  # parts, averaged
    raw = urllib.request.urlopen(urllib.request.Request(
        ours, data=json.dumps({"query": ["Q yes"], "prompts": ["Q "], "labels": ["yes"]}).encode(),
        headers={"Content-Type": "application/json"})).read()
    answer = json.loads(raw)
    assert answer["rewards"] == answer["scores"] == [pytest.approx(1.3)]
    assert answer["extra_logs"] == {"exact": [1.0], "length": [3.0]}


def test_batches_go_out_concurrently_with_labels(scripted):
    url, handler = scripted
    client = RemoteReward(url, FAST)
    scores = client(["a", "b", "c", "d", "e"], ["1", "22", "333", "4", "5"], [["L1"], [], ["L3"], ["L4"], ["L5"]])
    assert scores.tolist() == [2.0, 3.0, 4.0, 2.0, 2.0]  # len(prompt + response): order kept across batches
    sent = sorted(handler.requests, key=lambda d: d["prompts"][0])
    assert [d["prompts"] for d in sent] == [["a", "b"], ["c", "d"], ["e"]]
    assert [d["labels"] for d in sent] == [["L1", ""], ["L3", "L4"], ["L5"]]
    assert client.last_extra_logs == {"n_chars": pytest.approx(13 / 5)}


def test_retries_then_succeeds_on_a_failing_server(scripted):
    url, handler = scripted
    handler.plan = [500, 500]
    assert RemoteReward(url, FAST)(["a"], ["b"]).tolist() == [2.0]
    assert len(handler.requests) == 3  # two failures, then the answer


def test_errors_name_the_url_and_status(scripted):
    url, handler = scripted
    handler.plan = [500, 500, 500]
    with pytest.raises(RemoteRewardError, match=rf"reward server {url} failed after 3 attempt\(s\): HTTP 500"):
        RemoteReward(url, FAST)(["a"], ["b"])
    handler.plan = [404]
    handler.requests.clear()
    with pytest.raises(RemoteRewardError, match="failed after 1 attempt.*HTTP 404"):
        RemoteReward(url, FAST)(["a"], ["b"])
    handler.plan = ["short"]
    with pytest.raises(RemoteRewardError, match="returned 1 rewards for 2 queries"):
        RemoteReward(url, FAST)(["a", "b"], ["c", "d"])


def test_a_server_that_times_out(scripted):
    url, handler = scripted
    handler.plan = ["sleep", "sleep"]
    cfg = RemoteRewardSection(timeout_s=0.3, retries=1, backoff_s=0.01)
    with pytest.raises(RemoteRewardError, match=rf"{url} failed after 2 attempt\(s\): no answer within 0.3 s"):
        RemoteReward(url, cfg)(["a"], ["b"])


def test_nobody_listening():
    url = f"http://127.0.0.1:{free_port()}/"
    with pytest.raises(RemoteRewardError, match=rf"{url} failed after 1 attempt.*Connection"):
        RemoteReward(url, RemoteRewardSection(retries=0))(["a"], ["b"])


def test_serve_reward_command(tmp_path):
    (tmp_path / "reward.yaml").write_text("reward:\n  - {type: metric, metric: exact_match}\n"
                                          "  - {type: length, kwargs: {unit: words}, weight: 2}\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_engine.cli", "serve-reward", str(tmp_path / "reward.yaml"),
                             "--port", str(port)], cwd=REPO, env={**os.environ, **TEST_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "on http://127.0.0.1" in proc.stdout.readline()
        client = RemoteReward(f"http://127.0.0.1:{port}/", FAST)
        assert client(["P: "], ["two words"], [["two words"]]).tolist() == [1 + 2 * 2]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_reward_model_served_scores_as_in_process():
    from rlhf_engine.config import ModelConfig

    cfg = RewardConfig(type="model", model=ModelConfig(name_or_path="tiny-bert"), name="rm")
    reward = build_reward_set([cfg])
    server = make_server(reward, "127.0.0.1", 0)
    url = _serve(server)
    try:
        prompts, responses = ["Is tea good? ", "Rate this: "], ["Yes, very.", "Bad."]
        client = RemoteReward(url, FAST)
        remote = client(prompts, responses)
        local = reward(prompts, responses)
        assert remote.tolist() == pytest.approx(local.tolist(), abs=1e-6) and remote[0] != remote[1]
        assert set(client.last_extra_logs) == {"rm"}  # the served reward's parts come back as extra_logs
    finally:
        server.shutdown()
        server.server_close()
