"""Parameters that no optimizer updates: a one-time check after the first optimizer steps.

:func:`layerwise.add_multipliers` creates new parameters.  An optimizer built *before* it does not hold
them, so they get gradients but never change — silently.  :func:`watch` registers a global optimizer
step post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) that drops every watched
parameter some stepping optimizer holds; when any optimizer steps for the second time (so every optimizer of
a training loop has stepped once), the watched parameters that are still not held but do have a gradient are
reported with an :class:`UntrainedParameterWarning`, and the hook removes itself.  The cost is one pass over
the stepping optimizer's parameter list for the first two steps.
"""

from __future__ import annotations

import warnings
import weakref

from torch import nn


class UntrainedParameterWarning(UserWarning):
    """Trainable parameters with gradients that no optimizer holds: they will never change."""


_watched: list[tuple[weakref.ref, str]] = []
_steps: dict[int, int] = {}
_handle = None


def watch(named: list[tuple[str, nn.Parameter]]) -> None:
    """Check, at the first optimizer steps, that some optimizer holds each of ``named``."""
    global _handle
    _watched.extend((weakref.ref(p), n) for n, p in named)
    if _handle is None and _watched:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _handle = register_optimizer_step_post_hook(_after_step)


def _stop() -> None:
    global _handle
    if _handle is not None:
        _handle.remove()
        _handle = None
    _watched.clear()
    _steps.clear()


def _after_step(optimizer, args, kwargs) -> None:
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    _watched[:] = [(ref, n) for ref, n in _watched if ref() is not None and id(ref()) not in held]
    if not _watched:
        _stop()
        return
    _steps[id(optimizer)] = _steps.get(id(optimizer), 0) + 1
    if _steps[id(optimizer)] < 2:
        return
    missing = [n for ref, n in _watched if (p := ref()) is not None and p.requires_grad and p.grad is not None]
    _stop()
    if missing:
        warnings.warn(
            f"{len(missing)} learnable multiplier(s) (e.g. {', '.join(missing[:3])}) get gradients but are in no "
            "optimizer: add_multipliers() was called after the optimizer was built, so they never train. Build "
            "the parameter groups and the optimizer after add_multipliers().",
            UntrainedParameterWarning,
            stacklevel=2,
        )
