"""Logging of a seqrec process: one format with the rank, our packages at INFO, the libraries' chatter off."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# The project's own top-level packages: they log at INFO, everything else at WARNING.
OUR_PACKAGES = ("trainer", "data", "model", "runtime")


def setup_logging() -> None:
    # A process outside torchrun (the launcher's pre-flight check, a one-process evaluation) is no rank.
    rank = os.environ.get("RANK")
    where = f"rank{rank}" if rank is not None else "main"
    # WARNING at the root: fbgemm logs every table's arguments at INFO through the root logger, and
    # TorchRec its planner tables on every rank. Our own packages log at INFO.
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [{where}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,  # replace any handler an imported library installed first
    )
    for ours in OUR_PACKAGES:
        logging.getLogger(ours).setLevel(logging.INFO)
    # Notes meant for TorchRec's own developers (deprecations inside TorchRec, fx tracing internals).
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\.")
    # torch.distributed.checkpoint's note on every load of TorchRec's sharded tables (ShardedTensor is what
    # TorchRec's state dicts hold; nothing for a user to change).
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
