"""`rlhf-engine export --push-to-hub` against a local hub (HF_ENDPOINT on loopback) that records what arrives.

The fake hub implements the endpoints huggingface_hub calls for whoami, create_repo, create_branch,
README validation, preupload (answering "regular" so files travel base64-inline in the commit) and
the NDJSON commit. The run comes from the shared 2-rank checkpoint run (tests/ckpt_shared.py).
"""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants as hub_constants
import pytest

from rlhf_engine.cli import main as cli_main
from ckpt_shared import RUN_NAME, checkpoint_run
from helpers import free_port

TOKEN = "hf_test_token_123"


class FakeHub(BaseHTTPRequestHandler):
    """Records requests in `self.server.log` (method, path, auth) and commits in `self.server.commits`."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, method: str) -> None:
        body = self._body() if method == "POST" else b""
        auth = self.headers.get("Authorization")
        self.server.log.append((method, self.path, auth))
        if auth != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials"})
        parts = self.path.split("?")[0].strip("/").split("/")
        if method == "GET" and self.path == "/api/whoami-v2":
            return self._reply(200, {"type": "user", "name": "tester"})
        if method == "POST" and self.path == "/api/repos/create":
            payload = json.loads(body)
            self.server.created.append(payload)
            return self._reply(200, {"url": f"{self.server.url}/{payload['organization']}/{payload['name']}"})
        if method == "POST" and self.path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if method == "POST" and parts[:2] == ["api", "models"] and len(parts) == 6:
            repo, action, revision = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            if action == "branch":
                self.server.branches.append((repo, revision))
                return self._reply(200, {})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                   for f in files]})
            if action == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = {ln["value"]["path"]: base64.b64decode(ln["value"]["content"]) for ln in lines
                         if ln["key"] == "file"}
                self.server.commits.append({"repo": repo, "revision": revision, "files": files,
                                            "header": lines[0]["value"]})
                return self._reply(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{'a' * 40}",
                                         "commitOid": "a" * 40})
        return self._reply(404, {"error": f"fake hub: unexpected {method} {self.path}"})

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), FakeHub)
    server.url = f"http://127.0.0.1:{server.server_port}"
    server.log, server.created, server.branches, server.commits = [], [], [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # huggingface_hub reads these flags at import (conftest made the session offline): flip them for this test
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir, _ = checkpoint_run(tmp_path_factory)
    return workdir / RUN_NAME


def test_push_uploads_the_exported_folder(hub, run_dir, tmp_path):
    out = tmp_path / "export"
    code = cli_main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "tester/tiny-rlhf", "--private",
                     "--revision", "v1"])
    assert code == 0
    assert hub.created == [{"name": "tiny-rlhf", "organization": "tester", "visibility": "private", "type": "model"}]
    assert hub.branches == [("tester/tiny-rlhf", "v1")]
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["repo"] == "tester/tiny-rlhf" and commit["revision"] == "v1"
    local = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(commit["files"]) == set(local)  # every exported file, nothing else
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "README.md"):
        assert commit["files"][name] == local[name], f"{name} arrived altered"
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.log)


def test_no_token_fails_before_any_export(hub, run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    out = tmp_path / "export"
    assert cli_main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "tester/x"]) == 2
    assert "no Hugging Face token: set HF_TOKEN or run `huggingface-cli login`" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [] and hub.log == []


def test_unreachable_endpoint_and_bad_token_fail_before_any_export(hub, run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "export"
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert cli_main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "tester/x"]) == 2
    assert "rejected the Hugging Face token (401)" in capsys.readouterr().err
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", closed)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert cli_main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "tester/x"]) == 2
    assert f"cannot reach {closed}" in capsys.readouterr().err
    assert not out.exists() and [path for _, path, _ in hub.log] == ["/api/whoami-v2"]
