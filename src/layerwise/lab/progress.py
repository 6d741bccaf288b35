"""Progress of long commands, and stopping them cleanly.

* :class:`RunMonitor` — one live status line for ``compare`` / ``sweep`` / ``demo``: runs done, the step and
  current training loss of each running run, and an ETA.  It reads the runs' own ``metrics.jsonl`` (so it
  works the same for runs in this process and in worker processes) from a background thread.  On a terminal
  the line is redrawn in place; otherwise (a log file, CI) a full line is printed every ``log_interval``
  seconds.
* :class:`GracefulInterrupt` — during a run, Ctrl-C (SIGINT) only *requests* a stop: the trainer finishes
  the optimizer step it is in, writes a checkpoint and raises :class:`TrainingInterrupted`, so nothing is
  lost and ``--resume`` (or the same ``compare`` / ``sweep`` command) continues exactly there.  In the
  command's own process a second Ctrl-C stops at once; worker processes of ``--jobs N`` never escalate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

_STOP = False  # a stop was requested in this process (SIGINT)
_IN_WORKER = False  # this process is a worker of compare/sweep --jobs N


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped on request (Ctrl-C) after checkpointing step ``step``; ``--resume`` continues it."""

    def __init__(self, run_dir: str, step: int):
        super().__init__(run_dir, step)
        self.run_dir, self.step = run_dir, step

    def __str__(self) -> str:
        if not self.step:
            return f"{self.run_dir} was not started"
        return f"{self.run_dir} stopped after step {self.step} (checkpoint written)"


def stop_requested() -> bool:
    return _STOP


def _request_stop(signum=None, frame=None) -> None:
    global _STOP
    _STOP = True


def worker_init() -> None:
    """Initializer of compare/sweep worker processes: SIGINT requests a stop, it never raises."""
    global _IN_WORKER
    _IN_WORKER = True
    signal.signal(signal.SIGINT, _request_stop)


def signal_workers(executor) -> None:
    """Ask every worker process of a ``ProcessPoolExecutor`` to stop (a SIGINT that reached only us)."""
    for p in list(getattr(executor, "_processes", {}).values()):
        try:
            os.kill(p.pid, signal.SIGINT)
        except (OSError, AttributeError):
            pass


class GracefulInterrupt:
    """While active (main thread only), SIGINT sets a flag that the training loop polls between steps."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.prev: Callable[[int, FrameType | None], Any] | int | None = None  # the SIGINT handler replaced

    def __enter__(self) -> GracefulInterrupt:
        global _STOP
        if not self.enabled:
            return self
        if not _IN_WORKER:
            _STOP = False
        self.prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        global _STOP
        if _STOP and not _IN_WORKER:  # second Ctrl-C in the command's own process: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        _STOP = True
        if not _IN_WORKER:
            print(
                "\nstopping after this step (writing a checkpoint; Ctrl-C again to stop at once) ...",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc) -> None:
        if self.enabled and self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)


# ------------------------------------------------------------------------------------------------ monitor
def last_record(metrics: Path) -> dict | None:
    """The last complete JSON line of a ``metrics.jsonl`` (None if there is none yet)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 8192))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for ln in reversed(lines):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            return rec
    return None


def fmt_duration(s: float) -> str:
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class RunMonitor:
    """A status line over runs ``[(label, run_dir, max_steps)]`` while they train (see the module docstring)."""

    def __init__(
        self,
        runs: list[tuple[str, Path, int]],
        *,
        stream=None,
        interval: float = 1.0,
        log_interval: float = 60.0,
        enabled: bool = True,
    ):
        self.runs = [(label, Path(d), int(n)) for label, d, n in runs]
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval, self.log_interval = interval, log_interval
        self.enabled = enabled and bool(self.runs)
        self.finished: dict[str, float] = {}
        self.base = {label: self._step(d) for label, d, _ in self.runs}  # resumed runs start part-way
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_log = self.t0
        self._drawn = False

    @staticmethod
    def _step(run_dir: Path) -> int:
        rec = last_record(run_dir / "metrics.jsonl")
        return int(rec["step"]) if rec else 0

    def __enter__(self) -> RunMonitor:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, name="layerwise-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._clear()

    def _loop(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                line = self.status()
            except Exception:  # noqa: BLE001 - a status line must never break a run
                continue
            with self._lock:
                if self.tty:
                    width = shutil.get_terminal_size((120, 20)).columns
                    self.stream.write("\r" + line[: width - 1] + "\x1b[K")
                    self.stream.flush()
                    self._drawn = True
                elif time.perf_counter() - self._last_log >= self.log_interval:
                    self.stream.write(line + "\n")
                    self.stream.flush()
                    self._last_log = time.perf_counter()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def print(self, text: str) -> None:
        """Print a line above the status line."""
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def done(self, label: str) -> None:
        self.finished[label] = time.perf_counter()

    def status(self) -> str:
        """``3/7 runs done | adamw/seed0 120/220 loss 5.312 | ... | ETA 4m10s``."""
        total = sum(n for _, _, n in self.runs)
        base = sum(self.base.values())
        now_steps, running = 0, []
        for label, d, n in self.runs:
            if label in self.finished:
                now_steps += n
                continue
            rec = last_record(d / "metrics.jsonl")
            step = int(rec["step"]) if rec else self.base[label]
            now_steps += min(step, n)
            if rec and step > self.base[label] and step < n:
                loss = rec.get("loss")
                running.append(f"{label} {step}/{n}" + (f" loss {loss:.3f}" if isinstance(loss, float) else ""))
        elapsed = time.perf_counter() - self.t0
        rate = (now_steps - base) / elapsed if elapsed > 0 else 0.0
        eta = (total - now_steps) / rate if rate > 0 else float("nan")
        parts = [
            f"{len(self.finished)}/{len(self.runs)} runs done",
            *running,
            f"{fmt_duration(elapsed)} elapsed, ETA {fmt_duration(eta)}",
        ]
        return " | ".join(parts)
