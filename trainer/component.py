"""TorchX component that runs the trainer under torchrun, on any TorchX scheduler.

``train`` returns an AppDef with one role of ``nnodes`` replicas; each replica runs
``python -m torch.distributed.run ... -m trainer.main --config CONFIG <overrides>``. Overrides
(``--section.key=value``) go after ``--``. ``python`` must resolve to the project's environment on the
workers' PATH (launch.sh puts .venv/bin first; a container image must provide it).

Local, one node, two CPU ranks (what ``./launch.sh`` runs)::

    torchx run -s local_cwd trainer/component.py:train --config configs/default.toml \\
        --nproc_per_node 2 -- --train.train_steps=20

Slurm, two nodes with eight GPUs each (run from the repo on a shared filesystem)::

    torchx run -s slurm trainer/component.py:train --nnodes 2 --nproc_per_node 8 --gpu 8 \\
        --config configs/seq2seq.toml

Kubernetes (Volcano; the image must contain the repo and its environment)::

    torchx run -s kubernetes -cfg queue=default trainer/component.py:train --image REGISTRY/seqrec:TAG \\
        --nnodes 2 --nproc_per_node 8 --gpu 8 --config configs/seq2seq.toml

Add ``--dryrun`` after ``torchx run`` to print the scheduler request without submitting it.
"""

# No `from __future__ import annotations` and no `X | None` / `dict[...]` here: torchx 0.7 reads this
# function's annotations both from the AST (its linter accepts only `Optional`, `Dict`, `List` by name)
# and at run time (it decodes CLI strings with typing.Optional/Dict/List), so the typing-module spellings
# are what its CLI understands.
import shlex
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.specs import macros

TRAINER_MODULE = "trainer.main"
EVAL_MODULE = "trainer.evaluate"
ROLE_NAME = "trainer"
RDZV_PORT_NAME = "c10d"


class _Unquoted(str):
    """A shell word that must reach bash unquoted, so that bash expands the variable inside it."""


def _shell_join(words: List[str]) -> str:
    return " ".join(word if isinstance(word, _Unquoted) else shlex.quote(word) for word in words)


def _rdzv_endpoint(nnodes: int, rdzv_port: int) -> str:
    if nnodes == 1:
        # One torchrun agent hosts the store; port 0 lets it take any free port, so several local jobs
        # (tests, a second experiment) do not collide on 29500.
        return "localhost:0"
    # Every scheduler fills ${rank0_env} with the name of a variable holding rank 0's host; `$$` escapes
    # the `$` from torchx's own template substitution, so bash sees `${SOME_VAR:=localhost}:PORT`. The
    # localhost default covers schedulers that leave the variable unset on rank 0 itself.
    return _Unquoted(f"$${{{macros.rank0_env}:=localhost}}:{rdzv_port}")


def torchrun_command(
    script_args: List[str],
    config: str,
    nnodes: int,
    nproc_per_node: int,
    max_restarts: int,
    rdzv_port: int,
    rdzv_backend: str,
    module: str = TRAINER_MODULE,
) -> List[str]:
    """The torchrun command line, as shell words (the rendezvous endpoint may be an unquoted word)."""
    command = [
        # exec: torchrun replaces the wrapping bash, so the scheduler's signals reach it directly.
        "exec",
        "python",
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc_per_node",
        str(nproc_per_node),
        "--rdzv_backend",
        rdzv_backend,
        "--rdzv_endpoint",
        _rdzv_endpoint(nnodes, rdzv_port),
        "--rdzv_id",
        macros.app_id,
        "--max_restarts",
        str(max_restarts),
        # Tee both streams: ranks' lines reach the scheduler's log prefixed with [rank].
        "--tee",
        "3",
    ]
    if rdzv_backend == "static":
        # The static backend cannot discover ranks, so each node is told its own.
        command += ["--node_rank", macros.replica_id]
    # No config: the module's own default (trainer.evaluate's is the checkpoint's config.toml).
    return command + ["-m", module, *(["--config", config] if config else []), *script_args]


def _worker_env(env: Optional[Dict[str, str]], cpu: int, nproc_per_node: int) -> Dict[str, str]:
    worker_env = {
        "PYTHONUNBUFFERED": "1",
        # Split the replica's CPUs between its ranks; never 0 (the seed's cpu_count() // 16 was 0 on
        # small machines, which some libraries read as "use every core" and oversubscribe).
        "OMP_NUM_THREADS": str(max(1, cpu // nproc_per_node)),
    }
    worker_env.update(env or {})
    return worker_env


def train(
    *script_args: str,
    config: str = "configs/default.toml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = ".",
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    name: str = "seqrec",
) -> specs.AppDef:
    """Train a generative sequential recommender with torchrun on nnodes x nproc_per_node ranks.

    Args:
        script_args: config overrides for trainer.main, after ``--`` (e.g. ``-- --train.train_steps=20``)
        config: TOML config file, relative to the job's working directory (the repo root)
        nnodes: number of nodes (replicas of the trainer role)
        nproc_per_node: ranks per node (number of GPUs on a GPU node)
        cpu: CPUs per node; also sets OMP_NUM_THREADS = cpu // nproc_per_node (at least 1)
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        image: the working directory for local_cwd (ignored there), the container image for kubernetes/docker
        env: extra environment variables for every rank (e.g. ``LOGLEVEL=INFO,NCCL_DEBUG=WARN``)
        max_retries: how often the scheduler may rerun the whole job after a failure
        max_restarts: how often torchrun may restart the ranks of a node after a failure
        rdzv_port: port on rank 0's host for the c10d rendezvous store (multi-node only)
        rdzv_backend: torchrun rendezvous backend (c10d, or static)
        mounts: mounts for container schedulers (e.g. ``type=bind,src=/data,dst=/data``)
        name: job name
    """
    return _torchrun_app(
        TRAINER_MODULE, list(script_args), config, nnodes, nproc_per_node,
        specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h), image, env, max_retries, max_restarts, rdzv_port,
        rdzv_backend, mounts, name,
    )  # fmt: skip


def evaluate(
    *script_args: str,
    config: str = "",
    checkpoint: str = "",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = ".",
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    rdzv_backend: str = "c10d",
    mounts: Optional[List[str]] = None,
    name: str = "seqrec-eval",
) -> specs.AppDef:
    """Evaluate a checkpoint (leave-one-out HR@K / NDCG@K / MRR) with torchrun on nnodes x nproc_per_node ranks.

    Args:
        script_args: config overrides for trainer.evaluate, after ``--`` (e.g. ``-- --eval.protocol=sampled``)
        config: TOML config, relative to the job's working directory (default: the checkpoint's own config.toml,
            the one it was trained with)
        checkpoint: checkpoint folder (output_dir/step_N), or a run's output_dir (its best checkpoint)
        nnodes: number of nodes
        nproc_per_node: ranks per node (number of GPUs on a GPU node)
        cpu: CPUs per node; also sets OMP_NUM_THREADS = cpu // nproc_per_node (at least 1)
        gpu: GPUs per node
        memMB: memory per node in MB
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        image: the working directory for local_cwd (ignored there), the container image for kubernetes/docker
        env: extra environment variables for every rank
        rdzv_port: port on rank 0's host for the c10d rendezvous store (multi-node only)
        rdzv_backend: torchrun rendezvous backend (c10d, or static)
        mounts: mounts for container schedulers (e.g. ``type=bind,src=/data,dst=/data``)
        name: job name
    """
    if not checkpoint:
        raise ValueError("evaluate: --checkpoint (a checkpoint folder, output_dir/step_N) is required")
    return _torchrun_app(
        EVAL_MODULE, ["--checkpoint", checkpoint, *script_args], config, nnodes, nproc_per_node,
        specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h), image, env, 0, 0, rdzv_port, rdzv_backend, mounts, name,
    )  # fmt: skip


def _torchrun_app(
    module: str,
    script_args: List[str],
    config: str,
    nnodes: int,
    nproc_per_node: int,
    resource: specs.Resource,
    image: str,
    env: Optional[Dict[str, str]],
    max_retries: int,
    max_restarts: int,
    rdzv_port: int,
    rdzv_backend: str,
    mounts: Optional[List[str]],
    name: str,
) -> specs.AppDef:
    """One role of ``nnodes`` replicas, each running torchrun over ``python -m module``."""
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes and nproc_per_node must be >= 1, got {nnodes} and {nproc_per_node}")
    command = torchrun_command(
        script_args, config, nnodes, nproc_per_node, max_restarts, rdzv_port, rdzv_backend, module
    )
    role = specs.Role(
        name=ROLE_NAME,
        image=image,
        # Run through bash so that the rank-0 host variable in the rendezvous endpoint is expanded on the node.
        entrypoint="bash",
        args=["-c", _shell_join(command)],
        num_replicas=nnodes,
        resource=resource,
        env=_worker_env(env, resource.cpu, nproc_per_node),
        port_map={RDZV_PORT_NAME: rdzv_port},
        max_retries=max_retries,
        mounts=specs.parse_mounts(mounts) if mounts else [],
    )
    return specs.AppDef(name=name, roles=[role])
