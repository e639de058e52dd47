"""A 2-node job simulated on this machine: two torchrun node agents (1 rank each) meet through a c10d
rendezvous on 127.0.0.1 and train a few steps on gloo, as two hosts of a Slurm or Kubernetes job would
(there, the torchx component starts the same torchrun command on every node; see trainer/component.py).

Takes ~30 s on two cores.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from data.sample import SampleParams, ensure_sample_data
from tests.util import free_port, launched, torchrun

JOB_TIMEOUT_S = 240

pytestmark = pytest.mark.slow


def _node_agent(node: int, port: int, trainer_args: list[str]) -> list[str]:
    """The torchrun command of node ``node``: one rank, meeting the other node at 127.0.0.1:``port``."""
    return torchrun(
        *trainer_args, nnodes=2, nproc=1, rdzv_endpoint=f"127.0.0.1:{port}",
        # Both agents run on one host, so both would claim to host the rendezvous store: say which one does.
        launcher_args=["--rdzv_id", "multinode-test", "--rdzv_conf", f"is_host={'true' if node == 0 else 'false'}"],
    )  # fmt: skip


def test_two_node_agents_on_loopback_train_together(tmp_path: Path) -> None:
    data = ensure_sample_data(tmp_path / "data", SampleParams(users=256, files=2, rows_per_stripe=32))
    out = tmp_path / "run"
    trainer_args = [
        "--config", "configs/default.toml", f"--data.data_paths={data}", f"--train.output_dir={out}",
        "--train.train_steps=4", "--train.log_steps=2", "--train.progress_bar=false", "--model.num_layers=1",
        "--data.batch_size=8",
        # behavior_id as unbounded ids (bucket 0) in a managed-collision table, row-wise across the two nodes.
        "--data.features.2.hash_bucket_size=0", "--data.features.2.mc_capacity=64",
    ]  # fmt: skip
    port = free_port()
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    with contextlib.ExitStack() as stack:
        agents = [
            stack.enter_context(
                launched(_node_agent(n, port, trainer_args), env={"OMP_NUM_THREADS": "1"},
                         stdout=stack.enter_context(logs[n].open("w")), stderr=subprocess.STDOUT)
            )
            for n in range(2)
        ]  # fmt: skip
        codes = [agent.wait(timeout=JOB_TIMEOUT_S) for agent in agents]
    texts = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    # One rank per node: global ranks 0 and 1, each on its own node (local rank 0 of 1).
    assert "rank 0/2 (local 0/1)" in texts[0] + texts[1] and "rank 1/2 (local 0/1)" in texts[0] + texts[1]
    assert all("finished after 4 steps" in t for t in texts)
    assert (out / "metrics.jsonl").read_text().count("\n") == 2
