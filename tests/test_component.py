"""The torchx component: the AppDef it builds, and what `torchx run --dryrun` makes of it per scheduler."""

from __future__ import annotations

import ast
import importlib.util
import shlex
import subprocess

import pytest
from torchx.specs import macros

from tests.util import REPO_ROOT, python_module, run_job
from trainer.component import evaluate, train

COMPONENT = "trainer/component.py:train"


def _command(app) -> str:
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return role.args[1]


def test_single_node_appdef_runs_torchrun_with_config_and_overrides() -> None:
    app = train("--train.train_steps=5", "--model.num_layers=2", config="configs/x.toml", nproc_per_node=4, cpu=8)

    (role,) = app.roles
    words = shlex.split(_command(app))
    assert words[:4] == ["exec", "python", "-m", "torch.distributed.run"]
    assert words[words.index("--nnodes") + 1] == "1"
    assert words[words.index("--nproc_per_node") + 1] == "4"
    assert words[words.index("--rdzv_endpoint") + 1] == "localhost:0"
    assert words[words.index("--tee") + 1] == "3"
    assert words[words.index("--max_restarts") + 1] == "0"
    assert words[-6:] == ["-m", "trainer.main", "--config", "configs/x.toml", "--train.train_steps=5",
                          "--model.num_layers=2"]
    assert role.num_replicas == 1
    assert role.env["OMP_NUM_THREADS"] == "2"
    assert role.env["PYTHONUNBUFFERED"] == "1"
    assert role.port_map == {"c10d": 29500}


def test_evaluate_appdef_runs_the_evaluator_on_the_checkpoint() -> None:
    app = evaluate("--eval.protocol=sampled", config="configs/x.toml", checkpoint="outputs/r/step_5", nproc_per_node=2)
    words = shlex.split(_command(app))
    assert words[-7:] == ["-m", "trainer.evaluate", "--config", "configs/x.toml", "--checkpoint", "outputs/r/step_5",
                          "--eval.protocol=sampled"]
    with pytest.raises(ValueError, match="--checkpoint"):
        evaluate(config="configs/x.toml")
    # No config: trainer.evaluate then reads the checkpoint's own config.toml.
    words = shlex.split(_command(evaluate(checkpoint="outputs/r")))
    assert words[-4:] == ["-m", "trainer.evaluate", "--checkpoint", "outputs/r"]


def test_omp_threads_never_zero_and_env_overrides_win() -> None:
    app = train(cpu=2, nproc_per_node=8, env={"OMP_NUM_THREADS": "3", "FOO": "bar"})
    assert app.roles[0].env["OMP_NUM_THREADS"] == "3"
    assert app.roles[0].env["FOO"] == "bar"
    assert train(cpu=2, nproc_per_node=8).roles[0].env["OMP_NUM_THREADS"] == "1"


def test_multi_node_rendezvous_uses_rank0_host_macro() -> None:
    app = train(nnodes=3, nproc_per_node=8, gpu=8, rdzv_port=29511, max_retries=2)

    (role,) = app.roles
    command = _command(app)
    # Unquoted, so bash on each node expands the scheduler's rank-0 host variable.
    assert f" --rdzv_endpoint $${{{macros.rank0_env}:=localhost}}:29511 " in command
    assert "--nnodes 3" in command
    assert role.num_replicas == 3
    assert role.max_retries == 2
    assert role.resource.gpu == 8
    assert role.port_map == {"c10d": 29511}


def test_bad_topology_is_rejected() -> None:
    with pytest.raises(ValueError, match="nproc_per_node"):
        train(nproc_per_node=0)


def _torchx(*args: str) -> subprocess.CompletedProcess[str]:
    return run_job(python_module("torchx.cli.main", *args), timeout_s=120)


def _scheduler_request(stdout: str) -> str:
    marker = "=== SCHEDULER REQUEST ==="
    assert marker in stdout, stdout
    return stdout.split(marker, 1)[1]


@pytest.mark.slow
def test_local_cwd_dryrun_plans_the_torchrun_command() -> None:
    result = _torchx(
        "run", "--dryrun", "-s", "local_cwd", COMPONENT,
        "--config", "configs/default.toml", "--nproc_per_node", "2", "--", "--train.train_steps=3",
    )
    assert result.returncode == 0, result.stderr

    # The local request is printed as a pprint'ed dict (long strings wrapped into adjacent literals).
    request = ast.literal_eval(_scheduler_request(result.stdout).strip())
    (replica,) = request["role_params"]["trainer"]
    assert replica["args"][:2] == ["bash", "-c"]
    command = replica["args"][2]
    assert command.startswith("exec python -m torch.distributed.run --nnodes 1 --nproc_per_node 2 ")
    assert f"--rdzv_id '{request['app_id']}'" in command
    assert command.endswith("-m trainer.main --config configs/default.toml --train.train_steps=3")
    assert replica["cwd"] == str(REPO_ROOT)


@pytest.mark.slow
def test_slurm_dryrun_plans_two_nodes_of_eight() -> None:
    result = _torchx(
        "run", "--dryrun", "-s", "slurm", COMPONENT,
        "--nnodes", "2", "--nproc_per_node", "8", "--gpu", "8", "--cpu", "16", "--config", "configs/seq2seq.toml",
    )
    assert result.returncode == 0, result.stderr

    script = _scheduler_request(result.stdout)
    assert "#SBATCH hetjob" in script
    assert "--gpus-per-task=8" in script
    srun_lines = [line for line in script.splitlines() if "bash -c" in line]
    assert len(srun_lines) == 2  # one het group per node
    for line in srun_lines:
        assert "exec python -m torch.distributed.run --nnodes 2 --nproc_per_node 8" in line
        assert "--rdzv_endpoint ${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500" in line
        assert "-m trainer.main --config configs/seq2seq.toml" in line
        assert "OMP_NUM_THREADS=2" in line


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("kubernetes") is None,
    reason="torchx's kubernetes scheduler needs the `kubernetes` package even for --dryrun (not a project dependency)",
)
def test_kubernetes_dryrun_plans_volcano_job() -> None:
    # --workspace "": without it torchx builds a docker image of the repo, which needs a docker daemon.
    result = _torchx(
        "run", "--workspace", "", "--dryrun", "-s", "kubernetes", "-cfg", "queue=default", COMPONENT,
        "--image", "example/seqrec:latest", "--nnodes", "2", "--nproc_per_node", "8", "--gpu", "8",
    )
    assert result.returncode == 0, result.stderr
    assert "torch.distributed.run --nnodes 2 --nproc_per_node 8" in result.stdout
