"""Learning-rate schedules: linear warm-up, then ``cosine``, ``linear``, ``wsd`` or ``constant``.

One definition, used by the harness's trainer and offered by the Hugging Face and Lightning integrations.
A schedule is a multiplier ``f(step)`` of the base learning rate, where ``step`` is the 0-based index of the
optimizer step about to be taken (what ``torch.optim.lr_scheduler.LambdaLR`` passes).  With ``T`` total steps,
``W`` warm-up steps and ``r = min_lr_ratio``:

* warm-up (every schedule): ``f(s) = (s + 1) / W`` for ``s < W``;
* ``cosine``:   ``f = r + (1 − r)·½(1 + cos(π p))`` with ``p = (s − W) / (T − W)`` clamped to [0, 1];
* ``linear``:   ``f = r + (1 − r)(1 − p)``;
* ``constant``: ``f = 1``;
* ``wsd`` (warm-up, stable, decay): ``f = 1`` until the cool-down starts at ``D = T − round(decay_frac·T)``, then
  with ``q = (s − D) / (T − D)`` clamped to [0, 1] either ``r + (1 − r)(1 − q)`` (``decay_shape="linear"``) or
  ``r + (1 − r)(1 − √q)`` (``decay_shape="sqrt"``, the "1 − sqrt" cool-down of Hägele et al., 2024).

Steps at or beyond ``T`` keep the final value (``p = q = 1``).  :func:`lr_scheduler` wraps a schedule in a
``LambdaLR`` through a closure, so a scheduler's ``state_dict`` holds only its step count: a run resumed with
a longer ``total_steps`` follows the new schedule instead of the saved one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_SHAPES = ("linear", "sqrt")

__all__ = ["SCHEDULES", "DECAY_SHAPES", "Schedule", "lr_scheduler"]


@dataclass(frozen=True)
class Schedule:
    """``Schedule(name, total_steps, warmup_steps, min_lr_ratio, decay_frac, decay_shape)(step)`` -> LR factor.

    See the module docstring for the formulas.  Invalid arguments raise ``ValueError`` naming the argument.
    """

    name: str = "cosine"
    total_steps: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    decay_frac: float = 0.2
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule: unknown name {self.name!r}; choose one of {list(SCHEDULES)}")
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"schedule: total_steps must be an integer >= 1, got {self.total_steps!r}")
        if (
            isinstance(self.warmup_steps, bool)
            or not isinstance(self.warmup_steps, int)
            or not 0 <= self.warmup_steps <= self.total_steps
        ):
            raise ValueError(
                f"schedule: warmup_steps must be an integer in [0, total_steps], got "
                f"{self.warmup_steps!r} (total_steps={self.total_steps})"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"schedule: decay_shape must be one of {list(DECAY_SHAPES)}, got {self.decay_shape!r}")
        if self.name == "wsd":
            if not 0.0 < self.decay_frac <= 1.0:
                raise ValueError(f"schedule: decay_frac must be in (0, 1] for wsd, got {self.decay_frac!r}")
            if self.decay_start < self.warmup_steps:
                raise ValueError(
                    f"schedule: wsd's cool-down (the last {self.total_steps - self.decay_start} of "
                    f"{self.total_steps} steps, decay_frac={self.decay_frac}) overlaps the "
                    f"{self.warmup_steps} warm-up steps; lower decay_frac or the warm-up"
                )

    @property
    def decay_start(self) -> int:
        """First step of wsd's cool-down."""
        return self.total_steps - int(round(self.decay_frac * self.total_steps))

    def __call__(self, step: int) -> float:
        w, t, r = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if step < w:
            return (step + 1) / w
        if self.name == "constant":
            return 1.0
        if self.name == "wsd":
            d = self.decay_start
            if step < d:
                return 1.0
            q = min(1.0, (step - d) / max(1, t - d))
            return r + (1 - r) * (1 - (math.sqrt(q) if self.decay_shape == "sqrt" else q))
        p = min(1.0, (step - w) / max(1, t - w))
        if self.name == "linear":
            return r + (1 - r) * (1 - p)
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "cosine",
    total_steps: int = 1,
    *,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    decay_frac: float = 0.2,
    decay_shape: str = "linear",
    last_epoch: int = -1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :class:`Schedule` (each group's LR = its own base LR × the factor), stepped
    once per optimizer step.  Works with any optimizer, including the Hugging Face ``Trainer``
    (``Trainer(optimizers=(opt, lr_scheduler(opt, "wsd", max_steps, warmup_steps=...)))``)."""
    sched = Schedule(name, total_steps, warmup_steps, min_lr_ratio, decay_frac, decay_shape)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: sched(s), last_epoch=last_epoch)
