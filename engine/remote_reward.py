"""Rewards over HTTP, in OpenRLHF's protocol (so a server written for OpenRLHF works unchanged).

Request:  POST JSON {"query": [prompt + response, ...], "prompts": [prompt, ...], "labels": [label, ...]}
Response: JSON {"rewards": [float, ...]} (one per query), optionally "extra_logs": {name: [float, ...]}.
The label of a sample is its first reference text ("" without one).

``RemoteReward`` is the client (batches, concurrent requests, timeout, retries with exponential backoff);
``make_server`` serves any of our rewards on the protocol (stdlib ThreadingHTTPServer, one request
scored at a time).
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from rlhf_engine.config import RemoteRewardSection
from rlhf_engine.rewards import RewardError, RewardFunction

RETRY_STATUS = {408, 429, 500, 502, 503, 504}  # worth another try; other HTTP errors are the request's fault


class RemoteRewardError(RewardError):
    """The reward server failed: the message names the URL, the HTTP status or error, and the attempts."""


class RemoteReward(RewardFunction):
    """Client of a reward server speaking OpenRLHF's protocol (see the module doc)."""

    wants_context = True
    locate_failures = False  # a server failure is not one sample's; don't re-send samples one by one

    def __init__(self, url: str, settings: Optional[RemoteRewardSection] = None, scale: float = 1.0):
        super().__init__(scale)
        self.url, self.cfg = url, settings or RemoteRewardSection()
        self.name = f"remote {url}"
        self.last_extra_logs: dict[str, float] = {}

    def _post(self, payload: dict) -> dict:
        """One batch, with retries; returns the decoded JSON answer."""
        body = json.dumps(payload).encode()
        cfg, last = self.cfg, ""
        for attempt in range(cfg.retries + 1):
            if attempt:
                time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode(errors="replace")
                last = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code not in RETRY_STATUS:
                    break
            except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                last = f"no answer within {cfg.timeout_s:g} s" if isinstance(reason, TimeoutError) or \
                    "timed out" in str(reason) else f"{type(reason).__name__}: {reason}"
            except json.JSONDecodeError as e:
                raise RemoteRewardError(f"reward server {self.url} answered with invalid JSON ({e})") from None
        raise RemoteRewardError(f"reward server {self.url} failed after {attempt + 1} attempt(s): {last}; check that "
                                "the server is up and speaks OpenRLHF's protocol (POST JSON query/prompts/labels -> "
                                "rewards), or raise reward.remote.timeout_s / retries")

    def _batch(self, queries: list[str], prompts: list[str], labels: list[str]) -> tuple[list, dict]:
        answer = self._post({"query": queries, "prompts": prompts, "labels": labels})
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if rewards is None and isinstance(answer, dict):
            rewards = answer.get("scores")  # some OpenRLHF servers answer with "scores"
        if not isinstance(rewards, list):
            raise RemoteRewardError(f"reward server {self.url} answered without a 'rewards' list: {str(answer)[:200]}")
        if len(rewards) != len(queries):
            raise RemoteRewardError(f"reward server {self.url} returned {len(rewards)} rewards for {len(queries)} "
                                    "queries; it must return one per query")
        extra = answer.get("extra_logs") or {}
        return rewards, extra if isinstance(extra, dict) else {}

    def _score(self, prompts, responses, references=None, meta=None):
        labels = [refs[0] if refs else "" for refs in (references or [[] for _ in prompts])]
        queries = [p + r for p, r in zip(prompts, responses)]
        bs = self.cfg.batch_size
        spans = [(i, min(i + bs, len(queries))) for i in range(0, len(queries), bs)]
        with ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, max(1, len(spans)))) as pool:
            results = list(pool.map(lambda s: self._batch(queries[s[0]:s[1]], list(prompts[s[0]:s[1]]),
                                                          labels[s[0]:s[1]]), spans))
        rewards = [float(x) for batch, _ in results for x in batch]
        logs: dict[str, list] = {}
        for _, extra in results:
            for key, values in extra.items():
                logs.setdefault(key, []).extend(values if isinstance(values, list) else [values])
        self.last_extra_logs = {k: sum(map(float, v)) / len(v) for k, v in logs.items() if v}
        return rewards


# --------------------------------------------------------------------------------------------
def _split(query: str, prompt: str) -> str:
    """The response part of an OpenRLHF query (prompt + response)."""
    return query[len(prompt):] if prompt and query.startswith(prompt) else query


class _Handler(BaseHTTPRequestHandler):
    reward = None  # set by serve_reward
    lock = threading.Lock()

    def _reply(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802 (http.server's name)
        try:
            data = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            queries = data["query"]
            prompts = data.get("prompts") or [""] * len(queries)
            labels = data.get("labels") or [None] * len(queries)
            if not (isinstance(queries, list) and len(prompts) == len(queries) == len(labels)):
                raise ValueError("'query', 'prompts' and 'labels' must be lists of one length")
        except (ValueError, KeyError, TypeError) as e:
            self._reply(400, {"error": f"bad request: {e}; expected JSON {{query: [...], prompts: [...], labels: [...]}}"})
            return
        responses = [_split(q, p) for q, p in zip(queries, prompts)]
        references = [[lab] if isinstance(lab, str) and lab else [] for lab in labels]
        try:
            with self.lock:  # models are not re-entrant; requests queue here
                if hasattr(self.reward, "sentence_parts"):
                    scores, parts = self.reward.sentence_parts(prompts, responses, references)
                else:
                    scores, parts = self.reward(prompts, responses, references), {}
        except Exception as e:
            self._reply(500, {"error": f"{type(e).__name__}: {e}"})
            return
        rewards = [float(x) for x in scores]
        extra = {name: [float(x) for x in value] for name, value in parts.items()}
        self._reply(200, {"rewards": rewards, "scores": rewards, "extra_logs": extra})

    def log_message(self, fmt, *args):  # one line per request on stderr, as http.server does, but shorter
        pass


def make_server(reward, host: str = "127.0.0.1", port: int = 5000) -> ThreadingHTTPServer:
    """An HTTP server (not started) answering OpenRLHF reward requests with ``reward``: a RewardSet
    (every part sent back in extra_logs) or any reward callable (prompts, responses, references)."""
    handler = type("RewardHandler", (_Handler,), {"reward": reward, "lock": threading.Lock()})
    return ThreadingHTTPServer((host, port), handler)
