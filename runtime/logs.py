"""Logging of a seqrec process: one format with the rank, our packages at INFO, the libraries' chatter off."""

from __future__ import annotations

import logging
import os
import sys
import warnings

# The project's own top-level packages: they log at INFO, everything else at WARNING.
OUR_PACKAGES = ("trainer", "data", "model", "runtime")


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    # WARNING at the root: fbgemm logs every table's arguments at INFO through the root logger, and
    # TorchRec its planner tables on every rank. Our own packages log at INFO.
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,  # replace any handler an imported library installed first
    )
    for ours in OUR_PACKAGES:
        logging.getLogger(ours).setLevel(logging.INFO)
    # Notes meant for TorchRec's own developers (deprecations inside TorchRec, fx tracing internals).
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\.")
