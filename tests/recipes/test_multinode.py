"""Multi-node through DeepSpeed's own launcher: 2 "nodes" of 1 rank each on this machine (`--no_ssh`,
`--node_rank`, a hostfile naming two hosts) run PPO at ZeRO-3 exactly like one node with 2 ranks."""
import os
import subprocess
import sys

import pytest

from rlhf_engine.tracking import read_jsonl
from helpers import REPO, TEST_ENV, free_port, run_deepspeed

RECIPE = "recipes/tiny/ppo-zero3.yaml"
SETS = ["--set=train.steps=2", "--set=deepspeed.zero_stage=3", "--set=train.eval_size=0"]
KEYS = ("score/mean", "kl/mean", "loss/policy", "loss/value", "entropy", "advantages/mean")


def test_two_nodes_of_one_rank_equal_one_node_of_two(tmp_path):
    run_deepspeed("launch/train.py", RECIPE, f"--set=output_dir={tmp_path}", "--set=name=one-node", *SETS)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = free_port()
    env = {**os.environ, **TEST_ENV, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
         f"--node_rank={rank}", "--num_nodes", "2", "--num_gpus", "1", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "launch/train.py", RECIPE, f"--set=output_dir={tmp_path}", "--set=name=two-nodes",
         *SETS], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, log in zip(nodes, logs):
        assert node.returncode == 0, log[-4000:]
    for rank, log in enumerate(logs):  # each launcher started one local rank of a 2-node world
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in log, log[-3000:]
    one, two = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("one-node", "two-nodes"))
    assert [m["step"] for m in two] == [1, 2]
    for a, b in zip(one, two):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
