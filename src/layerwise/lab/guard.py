"""Non-finite loss / gradient detection that keeps the saved checkpoint the last finite one.

Two modes, chosen by where a host synchronisation is free:

* **eager** (one CPU process): before every ``optimizer.step`` the step's loss and gradient norm are tested on
  the host; on CPU that costs nothing (there is no asynchronous queue to drain), and the step that would
  write NaN into the weights and optimizer state never runs.
* **lagged** (CUDA, or several processes): a per-step host check would stall the CUDA queue (or add a
  collective per step), so each step only folds ``isfinite(loss) & isfinite(grad_norm)`` into a device-side
  flag (and the first bad step into a device-side counter) — no sync.  The flag is read at the points that
  already synchronise: every logging step (next to the all-reduce of the loss) and **before every checkpoint
  write**, where the weights are also checked.  A checkpoint is therefore never written once a non-finite
  value has appeared; the run stops with :class:`NonFiniteLossError` and the newest checkpoint on disk is the
  last finite one.  The in-memory weights of the few steps since the last check are discarded.

A skip-step (``torch.where`` on the update) was not used: it needs either an optimizer that accepts a
``found_inf`` tensor (only torch's fused Adam/AdamW, not AlphaAdam, Muon or the C kernels) or a copy of the
parameters and optimizer state every step (2-3x memory).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["NonFiniteLossError", "NonFiniteGuard"]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient; the newest checkpoint (the last finite one) is kept."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool tensor: every element of every tensor is finite (one foreach pass, no sync)."""
    tensors = [_local(t) for t in tensors if t is not None and _local(t).numel()]
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm([t.detach().float() if not t.is_floating_point() else t.detach() for t in tensors])
    return torch.isfinite(torch.stack([n.float() for n in norms]).sum())


class NonFiniteGuard:
    """See the module docstring.  ``where`` is called for the error message (e.g. the kept checkpoint)."""

    def __init__(self, device: str | torch.device, eager: bool, where=lambda: "no checkpoint was written"):
        self.eager = eager
        self.where = where
        self.device = torch.device(device)
        self.bad = torch.zeros((), dtype=torch.int64, device=self.device)  # non-finite steps since start
        self.first = torch.full((), -1, dtype=torch.int64, device=self.device)  # first bad step (1-based)
        self.last_loss = torch.zeros((), device=self.device)

    def _raise(self, step: int, what: str) -> None:
        raise NonFiniteLossError(
            f"non-finite {what} at step {step}; stopping before it reaches a checkpoint — "
            f"{self.where()}. Resume with a lower optim.lr (or enable optim.grad_clip): "
            "`layerwise train --resume RUN --set optim.lr=...`."
        )

    def before_step(
        self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, params: Iterable[torch.Tensor]
    ) -> None:
        """Call between backward (and clipping) and ``optimizer.step`` with the step's (1-based) number,
        its mean loss and the clipping norm (``None`` without clipping)."""
        if self.eager:
            if not torch.isfinite(loss):
                self._raise(step, f"training loss ({float(loss)})")
            if grad_norm is not None:
                finite = torch.isfinite(_local(grad_norm))
            else:
                finite = _all_finite([p.grad for p in params if p.grad is not None])
            if not bool(finite):
                self._raise(step, "gradient norm" if grad_norm is not None else "gradients")
            return
        ok = torch.isfinite(loss.detach())
        if grad_norm is not None:
            ok = ok & torch.isfinite(_local(grad_norm.detach())).to(ok.device)
        bad = (~ok).to(torch.int64)
        self.first = torch.where((self.first < 0) & (bad > 0), torch.full_like(self.first, step), self.first)
        self.bad += bad
        self.last_loss = loss.detach()

    def seen_nonfinite(self) -> bool:
        """This rank's flag, read without a collective (for error paths, where peers may be gone)."""
        try:
            return int(self.bad) > 0
        except Exception:  # noqa: BLE001 - a broken device: nothing to conclude
            return False

    def verify(self, ctx=None, params: Iterable[torch.Tensor] | None = None) -> None:
        """Host check of everything folded in since the start (and of ``params`` when given): call at points
        that synchronise anyway (logging, before a checkpoint).  Collective under a process group: call it on
        every rank at the same points."""
        big = 2**62
        weights_bad = (
            (~_all_finite(list(params))).to(torch.int64).to(self.device)
            if params is not None
            else torch.zeros((), dtype=torch.int64, device=self.device)
        )
        counts = torch.stack([self.bad, weights_bad])
        first = torch.where(self.first < 0, torch.full_like(self.first, big), self.first).clone()
        if ctx is not None and ctx.active and ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        bad, bad_weights = (int(v) for v in counts.cpu())
        if bad > 0:
            self._raise(int(first), "training loss or gradient norm")
        if bad_weights > 0:
            raise NonFiniteLossError(
                f"the weights hold NaN/Inf (a finite step overflowed); stopping before they "
                f"reach a checkpoint — {self.where()}. Resume with a lower optim.lr."
            )
