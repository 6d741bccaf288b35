"""PyTorch Lightning integration: AlphaDecay callback, weight-decay monitor, a causal-LM LightningModule.

Quick start::

    import lightning as L
    from layerwise.integrations.lightning import AlphaDecayCallback, LayerwiseLM, WeightDecayMonitor

    module = LayerwiseLM(my_causal_lm, optimizer="alphaadam", lr=3e-3, weight_decay=0.1,
                         multipliers="rowcol", warmup_steps=100, total_steps=10_000)
    trainer = L.Trainer(max_steps=10_000, gradient_clip_val=1.0,
                        callbacks=[AlphaDecayCallback(interval=500), WeightDecayMonitor()])
    trainer.fit(module, train_loader, val_loader)

Design
------
* **Where the controller attaches.**  Lightning runs ``configure_optimizers`` (optimizer *and* LR scheduler)
  inside ``strategy.setup``, before ``on_fit_start``, and loads a checkpoint's optimizer state before the first
  step.  :class:`AlphaDecayCallback` builds :class:`layerwise.AlphaDecay` at ``on_fit_start``; build order does
  not matter, since the controller never regroups the optimizer and only writes ``weight_decay``.  It needs
  each analysed matrix in a parameter group of its own: :class:`LayerwiseLM` builds that layout when the
  trainer has an :class:`AlphaDecayCallback` (``per_matrix=None``: the callback's
  :attr:`~AlphaDecayCallback.per_matrix`); for your own module, call
  ``build_optimizer(module, ..., per_matrix=True)`` in ``configure_optimizers``.  Another layout raises
  :class:`layerwise.GroupLayoutError`, which names the call.
* **State.**  The callback's ``state_dict`` (Lightning stores it in every checkpoint) is exactly
  ``AlphaDecay.state_dict()``; ``load_state_dict`` (called by Lightning before ``on_fit_start`` on
  ``fit(ckpt_path=...)``) keeps it until the controller exists.  Resumed equals uninterrupted.
* **Step counting.**  The controller counts steps of the raw ``torch.optim.Optimizer`` with a step post-hook
  (Lightning's ``LightningOptimizer`` is unwrapped), i.e. real optimizer steps: gradient accumulation and
  AMP-skipped steps are handled.
* **Logging.**  The callback logs α and λ (summary, and per module by default) to every logger of the trainer
  each time they are recomputed.  :class:`WeightDecayMonitor` logs the weight decay of every parameter group, in
  the style of ``LearningRateMonitor``, named by the canonical parameter name (single-parameter groups) or the
  group label.

Weight decay is PyTorch's coupled convention: one step does ``θ ← θ·(1 − lr·λ)``.
This module never imports ``layerwise.lab``.
"""

from __future__ import annotations

from typing import Any, cast

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from layerwise.integrations._common import (
    OPTIMIZERS,
    DecayCallbackBase,
    build_optimizer,
    optimizer_kwargs,
    unwrap_optimizer,
)

__all__ = ["OPTIMIZERS", "build_optimizer", "AlphaDecayCallback", "WeightDecayMonitor", "LayerwiseLM"]


def _log_to_loggers(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


class AlphaDecayCallback(DecayCallbackBase, pl.Callback):
    """:class:`layerwise.AlphaDecay` as a Lightning callback (per-module weight decay from spectral α).

    Args:
        interval, log_per_module, prefix, **options: see :class:`~layerwise.integrations._common.DecayCallbackBase`
            (``options`` are :class:`layerwise.AlphaDecay`'s keywords).
        optimizer_index: which of ``trainer.optimizers`` to control.

    Attributes:
        decay: the controller (``None`` before ``fit`` starts); ``decay.table()`` lists α and λ per matrix.
    """

    layout_advice = (
        "LayerwiseLM builds it when the trainer has this callback; in your own configure_optimizers use "
        "layerwise.integrations.lightning.build_optimizer(module, ..., per_matrix={0})"
    )

    def __init__(
        self,
        interval: int = 500,
        *,
        optimizer_index: int = 0,
        log_per_module: bool = True,
        prefix: str = "alphadecay",
        **options: Any,
    ) -> None:
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"optimizer_index must be an integer >= 0, got {optimizer_index!r}")
        super().__init__(interval, log_per_module=log_per_module, prefix=prefix, **options)
        self.optimizer_index = optimizer_index
        self._logged_version: int | None = None

    # lifecycle ---------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.optimizer_index >= len(trainer.optimizers):
            raise ValueError(
                f"AlphaDecayCallback optimizer_index={self.optimizer_index} but the trainer has "
                f"{len(trainer.optimizers)} optimizer(s)"
            )
        resumed = self._pending is not None
        self.attach(trainer.optimizers[self.optimizer_index], pl_module)
        self._logged_version = self.decay.version if resumed else None  # a resumed version was logged before

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._maybe_log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_log(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.decay is not None and stage == "fit":
            self.decay.remove()  # the decays stay set; the controller stays readable

    def _maybe_log(self, trainer: pl.Trainer) -> None:
        if self.decay is None or self.decay.version == self._logged_version:
            return
        self._logged_version = self.decay.version
        if trainer.loggers:
            _log_to_loggers(trainer, self.log_items(), step=trainer.global_step)


class WeightDecayMonitor(pl.Callback):
    """Log the weight decay of every parameter group, like ``LearningRateMonitor`` does for learning rates.

    Metric names: ``{prefix}/{canonical parameter name}`` for a group of one parameter (e.g. a matrix that
    AlphaDecay controls), ``{prefix}/{group label}`` for a labelled group (``"vector"``, ``"multiplier"``...),
    else ``{prefix}/pg{j}``; with several optimizers ``{prefix}`` becomes ``{prefix}-opt{i}``.  Names that would
    repeat get ``-pg{j}`` appended.

    Args:
        logging_interval: ``"step"`` (every ``trainer.log_every_n_steps`` optimizer steps) or ``"epoch"``.
        log_shrink: also log ``lr·λ`` (``{prefix}-shrink/...``), the per-step decoupled shrink
            ``θ ← θ·(1 − lr·λ)`` (PyTorch's convention; for torch ``Adam``'s coupled L2 it is only nominal).
        prefix: metric-name prefix.

    Raises:
        MisconfigurationException: at ``on_train_start`` when the trainer has no logger (as LearningRateMonitor).
    """

    def __init__(self, logging_interval: str = "step", log_shrink: bool = False, prefix: str = "wd") -> None:
        if logging_interval not in ("step", "epoch"):
            raise MisconfigurationException(f"logging_interval should be 'step' or 'epoch', got {logging_interval!r}")
        self.logging_interval = logging_interval
        self.log_shrink = bool(log_shrink)
        self.prefix = str(prefix)
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "Cannot use `WeightDecayMonitor` callback with `Trainer` that has no logger."
            )

    def names(self, trainer: pl.Trainer) -> list[list[str]]:
        """The metric name of every group of every optimizer (``names[i][j]``)."""
        out: list[list[str]] = []
        multi = len(trainer.optimizers) > 1
        for i, opt in enumerate(trainer.optimizers):
            prefix = f"{self.prefix}-opt{i}" if multi else self.prefix
            names: list[str] = []
            for j, g in enumerate(unwrap_optimizer(opt).param_groups):
                pn = g.get("param_names")
                if pn and len(pn) == 1:
                    name = f"{prefix}/{pn[0]}"
                elif isinstance(g.get("group"), str):
                    name = f"{prefix}/{g['group']}"
                else:
                    name = f"{prefix}/pg{j}"
                if name in names:
                    name = f"{name}-pg{j}"
                names.append(name)
            out.append(names)
        return out

    def extract(self, trainer: pl.Trainer) -> dict[str, float]:
        """Current ``{name: weight_decay}`` (and shrinks with ``log_shrink``)."""
        stats: dict[str, float] = {}
        for opt, names in zip(trainer.optimizers, self.names(trainer)):
            for g, name in zip(unwrap_optimizer(opt).param_groups, names):
                wd = float(g.get("weight_decay", 0.0))
                stats[name] = wd
                if self.log_shrink:
                    lr = g["lr"]
                    lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
                    stats[name.replace(self.prefix, f"{self.prefix}-shrink", 1)] = lr * wd
        return stats

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (
            self.logging_interval != "step"
            or trainer.global_step % max(1, getattr(trainer, "log_every_n_steps", 1)) != 0
        ):
            return
        self.last = self.extract(trainer)
        _log_to_loggers(trainer, self.last, step=trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.logging_interval != "epoch":
            return
        self.last = self.extract(trainer)
        _log_to_loggers(trainer, self.last, step=trainer.global_step)


class LayerwiseLM(pl.LightningModule):
    """A causal LM trained with layerwise's optimizers (an example module; also usable as is).

    Wraps any causal LM ``model``: ``model(input_ids)`` returning logits ``(B, T, V)``, an object with
    ``.logits`` (Hugging Face) or a tuple whose first element is the logits.  Batches are either
    ``(inputs, targets)`` (targets already shifted: ``targets[:, t]`` is the token after ``inputs[:, t]``) or a
    dict with ``input_ids`` and optional ``labels`` in Hugging Face's convention (unshifted, ``-100`` ignored).
    The loss is the token-mean cross-entropy in float32.

    Args:
        model: the causal LM.
        optimizer, lr, weight_decay, **optimizer_options: passed to :func:`build_optimizer` (``weight_decay``:
            PyTorch's coupled convention ``θ ← θ·(1 − lr·λ)``; ``optimizer_options``: ``betas``, ``eps``,
            ``scaling``, ``multiplier_weight_decay``, ... and the optimizer's own options such as AlphaAdam's
            ``fast``), checked now.
        multipliers: ``None`` or a kind (``"rowcol"``, ``"row"``, ``"col"``, ``"scalar"``) — adds learnable
            multipliers (:func:`layerwise.add_multipliers`, ``placement``) at construction.
        placement: multiplier placement (``"paper"`` or ``"symmetry_free"``).
        warmup_steps, total_steps, min_lr_ratio, schedule, decay_frac, decay_shape: the LR schedule of
            :mod:`layerwise.schedules` — linear warm-up, then ``schedule`` (``"cosine"`` (default),
            ``"wsd"``, ``"linear"``, ``"constant"``) to ``min_lr_ratio·lr`` at ``total_steps``; ``decay_frac`` /
            ``decay_shape`` shape WSD's cool-down.  ``total_steps=None``: constant after warm-up (only with
            ``cosine`` or ``constant``).  Stepped every optimizer step.
        per_matrix: the group layout (:func:`layerwise.param_groups`); ``None`` (default): the layout the
            trainer's :class:`AlphaDecayCallback` needs (its :attr:`~AlphaDecayCallback.per_matrix`), or no
            per-matrix groups when it has none.

    Gradient clipping (``Trainer(gradient_clip_val=...)``, norm algorithm) leaves multipliers out of the global
    norm (:func:`layerwise.clip_grad_norm_` with ``exclude=``), as the multipliers paper recommends.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: str = "alphaadam",
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        *,
        multipliers: str | None = None,
        placement: str = "paper",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        schedule: str = "cosine",
        decay_frac: float = 0.2,
        decay_shape: str = "linear",
        per_matrix: Any = None,
        **optimizer_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.optimizer_kwargs = optimizer_kwargs(name=optimizer, lr=lr, weight_decay=weight_decay, **optimizer_options)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps <= warmup_steps):
            raise ValueError(f"total_steps must be None or an integer > warmup_steps, got {total_steps!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        from layerwise.schedules import Schedule

        if total_steps is None:
            if schedule not in ("cosine", "constant"):
                raise ValueError(f"schedule={schedule!r} needs total_steps")
            self._schedule = Schedule("constant", max(1, warmup_steps), warmup_steps)
        else:
            self._schedule = Schedule(schedule, total_steps, warmup_steps, min_lr_ratio, decay_frac, decay_shape)
        self.model = model
        self.multiplier_params: list[nn.Parameter] = []
        if multipliers is not None:
            from layerwise.multipliers import add_multipliers

            self.multiplier_params = add_multipliers(self.model, kind=multipliers, placement=placement)
        self.per_matrix = per_matrix

    # model -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids)
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)):
            return out[0]
        return out

    def _loss(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, dict):
            x = batch["input_ids"]
            labels = batch["labels"] if "labels" in batch else x
            logits = cast(torch.Tensor, self(x))[:, :-1]
            y = labels[:, 1:]
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
            logits = cast(torch.Tensor, self(x))
        else:
            raise TypeError("batch must be (inputs, targets) or a dict with 'input_ids' (and optional 'labels')")
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True)
        return loss

    # optimisation ------------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        """The LR schedule's multiplier at optimizer step ``step`` (0-based; :class:`layerwise.schedules.Schedule`)."""
        return self._schedule(step)

    def group_layout(self) -> Any:
        """The ``per_matrix`` the optimizer is built with: the module's own, else the one the trainer's
        :class:`AlphaDecayCallback` needs, else ``False``."""
        if self.per_matrix is not None:
            return self.per_matrix
        trainer = self._trainer
        needs = [cb.per_matrix for cb in getattr(trainer, "callbacks", []) if isinstance(cb, AlphaDecayCallback)]
        return needs[0] if needs else False

    def configure_optimizers(self) -> Any:
        opt = build_optimizer(self, **dict(self.optimizer_kwargs, per_matrix=self.group_layout()))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: self._schedule(s))  # state: the step count only
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if (
            not self.multiplier_params
            or gradient_clip_val is None
            or gradient_clip_val <= 0
            or (gradient_clip_algorithm not in (None, "norm"))
        ):
            self.clip_gradients(
                optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
            )
            return
        from layerwise.optim.clip import clip_grad_norm_

        clip_grad_norm_(
            [p for p in self.parameters() if p.requires_grad], float(gradient_clip_val), exclude=self.multiplier_params
        )
