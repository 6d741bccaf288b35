"""Ending a distributed run cleanly when a peer stalls or dies, or when the torchrun agent is killed.

* Every collective runs under the process group's timeout (``train.dist_timeout_s``, passed to
  ``init_process_group``).  When it expires — a rank stopped (``kill -STOP``), hung, or died — the waiting
  ranks get a backend error, which :func:`translate` turns into :class:`DistributedTimeoutError` naming the
  key; the process exits non-zero and torchrun then ends the remaining workers.
* :func:`watch_parent` (workers started by torchrun only) polls the parent pid once a second; if the agent
  is gone (``kill -9`` of torchrun, which cannot forward a signal), the worker exits instead of training on
  as an orphan.  Checkpoints are atomic and the run lock is released by the kernel, so nothing is lost.
"""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["DistributedTimeoutError", "translate", "watch_parent"]

_TIMEOUT_WORDS = ("timed out", "timeout", "time out")
_PEER_WORDS = (
    "connection closed by peer",
    "connection reset",
    "broken pipe",
    "socket closed",
    "nccl",
    "gloo",
    "watchdog",
)


class DistributedTimeoutError(RuntimeError):
    """A collective did not complete: another rank stalled past ``train.dist_timeout_s`` or died."""


def translate(exc: BaseException, ctx, timeout_s: float) -> BaseException:
    """``exc`` as a :class:`DistributedTimeoutError` when it is a collective's timeout / lost peer under an
    active process group; otherwise ``exc`` itself."""
    if ctx is None or not ctx.active or ctx.world_size <= 1 or isinstance(exc, DistributedTimeoutError):
        return exc
    import torch.distributed as dist

    msg = str(exc).lower()
    dist_errors = tuple(
        c for c in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None)) if c is not None
    )
    if not (
        isinstance(exc, dist_errors)
        or (isinstance(exc, RuntimeError) and any(w in msg for w in _TIMEOUT_WORDS + _PEER_WORDS))
    ):
        return exc
    kind = "timed out" if any(w in msg for w in _TIMEOUT_WORDS) else "lost its peer"
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return DistributedTimeoutError(
        f"rank {ctx.rank}/{ctx.world_size}: a collective {kind} (train.dist_timeout_s={timeout_s:g}): another "
        f"rank stalled or died. Stopping; the newest checkpoint is kept — resume with `layerwise train --resume "
        f"RUN`. ({type(exc).__name__}: {first})"
    )


_watching = False


def watch_parent(interval_s: float = 1.0) -> bool:
    """Start the orphan watchdog in a torchrun worker (``TORCHELASTIC_RUN_ID`` set); returns whether started."""
    global _watching
    if _watching or "TORCHELASTIC_RUN_ID" not in os.environ or os.name != "posix":
        return False
    parent = os.getppid()
    if parent == 1:
        return False

    def loop() -> None:
        import time

        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                sys.stderr.write(
                    f"layerwise: the torchrun agent (pid {parent}) is gone; rank "
                    f"{os.environ.get('RANK', '?')} (pid {os.getpid()}) stops instead of training on "
                    "as an orphan\n"
                )
                sys.stderr.flush()
                os._exit(1)

    threading.Thread(target=loop, name="layerwise-parent-watch", daemon=True).start()
    _watching = True
    return True
