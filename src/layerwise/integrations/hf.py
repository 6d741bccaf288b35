"""Hugging Face ``Trainer`` integration: optimizer factory, AlphaDecay callback, multiplier export.

Quick start::

    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    import layerwise as lw
    from layerwise.integrations.hf import AlphaDecayCallback, layerwise_optimizer, save_merged

    model = LlamaForCausalLM(LlamaConfig(...))
    lw.add_multipliers(model)                          # optional, before the optimizer is built
    trainer = Trainer(
        model=model, args=TrainingArguments(..., max_grad_norm=0.0),
        train_dataset=ds,
        optimizer_cls_and_kwargs=layerwise_optimizer("alphaadam", lr=3e-3, weight_decay=0.1),
        callbacks=[AlphaDecayCallback(interval=500), MultiplierClipCallback(1.0)],
    )
    trainer.train()
    save_merged(model, "out/final")                    # plain LlamaForCausalLM checkpoint

The LR schedules of :mod:`layerwise.schedules` (``cosine``, ``wsd``, ``linear``, ``constant``, with warm-up)
are offered as :func:`lr_scheduler`: build the optimizer and pass both,
``Trainer(optimizers=(opt, lr_scheduler(opt, "wsd", max_steps, warmup_steps=100, decay_frac=0.2)))``.

Design
------
* **Optimizer factory.**  ``Trainer.create_optimizer`` calls ``cls()(model, **kwargs)`` when the first element
  of ``optimizer_cls_and_kwargs`` is not a ``torch.optim.Optimizer`` subclass (transformers' optimizer-factory
  protocol).  :class:`LayerwiseOptimizerFactory` is such a factory: it ignores the two groups the Trainer would
  build and calls :func:`build_optimizer` on the model (our groups: canonical names, width scaling, multiplier
  group, no decay on norms/biases).  ``TrainingArguments.learning_rate`` / ``weight_decay`` / ``adam_*`` are
  **not used** — the factory's ``lr`` and ``weight_decay`` are; the LR scheduler still comes from
  ``TrainingArguments`` and multiplies each group's own LR (width scaling is kept).  With transformers versions
  without factories, build the optimizer yourself: ``Trainer(optimizers=(build_optimizer(model, ...), None))``.
* **Group layout.**  AlphaDecay sets one weight decay per matrix, so each analysed matrix needs a parameter
  group of its own; controllers never regroup an optimizer, so :func:`build_optimizer` builds that layout
  (``per_matrix=True``, default: one group per block matrix; ``per_matrix="authors"`` or the callback's
  ``select`` for other module sets).  The Trainer creates its LR scheduler and loads a checkpoint's optimizer
  state before any callback event that sees the optimizer; neither matters: :class:`AlphaDecayCallback`
  attaches at ``on_train_begin`` and only writes ``weight_decay``.  An optimizer built otherwise (the Trainer's
  default AdamW) makes the callback raise :class:`layerwise.GroupLayoutError`, which names the call to make.
* **Step counting.**  The controller counts *optimizer* steps with a step post-hook on the innermost optimizer
  (accelerate's ``AcceleratedOptimizer`` is unwrapped), so gradient accumulation and skipped fp16 steps are
  handled; recomputation happens right after every ``interval``-th step.
* **Logging.**  ``on_log`` adds α and λ (summary and, by default, per module) to the ``logs`` dict and to the
  matching entry of ``state.log_history``.  The Trainer runs reporting integrations (TensorBoard, W&B ...)
  *before* user callbacks; call :func:`move_callback_first` so that they record the keys too.
* **Resume.**  The callback is an ``ExportableState``: ``AlphaDecay.state_dict()`` (the one resume payload) is
  written into ``trainer_state.json`` of every checkpoint, and on ``train(resume_from_checkpoint=...)`` it is
  loaded into the controller at ``on_train_begin`` (step count, α, decays), independent of
  ``restore_callback_states_from_checkpoint``.
* **Multipliers.**  :func:`layerwise.add_multipliers` works on ``LlamaForCausalLM`` (names stay
  ``model.layers.N...weight``; multipliers are ``...row_multiplier`` etc.).  Trainer checkpoints then contain the
  multipliers (resume needs the model wrapped the same way); :func:`save_merged` writes a plain checkpoint that
  ``LlamaForCausalLM.from_pretrained`` loads.  :class:`MultiplierClipCallback` clips gradients with multipliers
  left out of the global norm (the paper's recipe) — set ``max_grad_norm=0`` so the Trainer does not clip first.

Weight decay is PyTorch's coupled convention: one step does ``θ ← θ·(1 − lr·λ)``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from layerwise.integrations._common import OPTIMIZERS, DecayCallbackBase, build_optimizer, optimizer_kwargs
from layerwise.schedules import lr_scheduler

__all__ = [
    "OPTIMIZERS",
    "build_optimizer",
    "LayerwiseOptimizerFactory",
    "layerwise_optimizer",
    "AlphaDecayCallback",
    "MultiplierClipCallback",
    "move_callback_first",
    "merged_state_dict",
    "save_merged",
    "lr_scheduler",
]


# ---------------------------------------------------------------------------------------------- optimizer


class LayerwiseOptimizerFactory:
    """Transformers optimizer factory: ``LayerwiseOptimizerFactory()(model, **kwargs)`` returns
    :func:`build_optimizer` ``(model, **kwargs)``.

    Use through ``Trainer(optimizer_cls_and_kwargs=layerwise_optimizer(...))`` (or
    ``(LayerwiseOptimizerFactory, kwargs)``).  Stateless; the model comes from the Trainer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:  # an older transformers called optimizer_cls(param_groups, **kwargs)
            raise TypeError(
                "LayerwiseOptimizerFactory was called as an optimizer class: this transformers version has no "
                "optimizer factories. Build the optimizer yourself: "
                "Trainer(optimizers=(build_optimizer(model, ...), None))"
            )

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        kwargs.pop("model", None)  # the Trainer's model wins
        return build_optimizer(model, **kwargs)


def layerwise_optimizer(
    name: str = "alphaadam", lr: float = 1e-3, weight_decay: float = 0.1, **options: Any
) -> tuple[type[LayerwiseOptimizerFactory], dict[str, Any]]:
    """``(LayerwiseOptimizerFactory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Arguments are those of :func:`build_optimizer` (validated now, so a bad value fails when the Trainer is
    built rather than when training starts); ``per_matrix=True`` (default) builds the group layout
    :class:`AlphaDecayCallback` needs with its default options.  ``lr``/``weight_decay`` here replace
    ``TrainingArguments.learning_rate``/``weight_decay``; the Trainer's LR schedule multiplies each group's LR.
    """
    return LayerwiseOptimizerFactory, optimizer_kwargs(name=name, lr=lr, weight_decay=weight_decay, **options)


# -------------------------------------------------------------------------------------------- AlphaDecay


def _json_select(select: Any) -> Any:
    if select is None or isinstance(select, str):
        return select
    if isinstance(select, (list, tuple)) and all(isinstance(s, str) for s in select):
        return list(select)
    raise TypeError(
        "AlphaDecayCallback select must be None, a regex string or a list of parameter names (it is saved in "
        f"trainer_state.json), got {type(select).__name__}"
    )


class AlphaDecayCallback(DecayCallbackBase, TrainerCallback, ExportableState):
    """Attach :class:`layerwise.AlphaDecay` to the Trainer's optimizer, log α and λ, survive resume.

    At ``on_train_begin`` the controller is built on the (unwrapped) optimizer and the model: it computes α from
    the current weights and sets each analysed matrix's decay; afterwards it recomputes right after every
    ``interval``-th optimizer step, counting steps itself.  The optimizer must hold each analysed matrix in a
    group of its own (:func:`layerwise_optimizer` / :func:`build_optimizer` with ``per_matrix=``
    :attr:`per_matrix`, which is ``True`` by default); :class:`layerwise.GroupLayoutError` otherwise.

    Args:
        interval, log_per_module, prefix, **options: see :class:`~layerwise.integrations._common.DecayCallbackBase`
            (``options`` are :class:`layerwise.AlphaDecay`'s keywords; ``select`` must be ``None``, a regex
            string or a list of names, since the arguments are stored in ``trainer_state.json``).  The summary
            ``{prefix}/alpha_mean|min|max``, ``{prefix}/weight_decay_mean|min|max`` and ``{prefix}/version``
            are added to every log.

    Attributes:
        decay: the :class:`layerwise.AlphaDecay` (``None`` before training starts).
        resume_state: ``AlphaDecay.state_dict()`` to load at the next ``on_train_begin`` (set by transformers'
            ``_load_callback_state`` when ``restore_callback_states_from_checkpoint=True``).
    """

    layout_advice = (
        "Trainer(optimizer_cls_and_kwargs=layerwise_optimizer(..., per_matrix={0})) or "
        "Trainer(optimizers=(build_optimizer(model, ..., per_matrix={0}), None))"
    )

    def __init__(
        self, interval: int = 500, *, log_per_module: bool = True, prefix: str = "alphadecay", **options: Any
    ) -> None:
        if "select" in options:
            options["select"] = _json_select(options["select"])
        super().__init__(interval, log_per_module=log_per_module, prefix=prefix, **options)

    @property
    def resume_state(self) -> dict | None:
        return self._pending

    @resume_state.setter
    def resume_state(self, state: dict | None) -> None:
        self._pending = None
        self.load_state_dict(state)

    # ExportableState ---------------------------------------------------------------------------------
    def state(self) -> dict:
        """``{"args": constructor arguments, "attributes": {"resume_state": AlphaDecay.state_dict()}}``."""
        args = dict(self.options, log_per_module=self.log_per_module, prefix=self.prefix)
        return {"args": args, "attributes": {"resume_state": self.state_dict() or None}}

    def _saved_state(self, state: Any) -> dict | None:
        if self._pending is not None:
            return self._pending
        stored = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        if isinstance(stored, list):  # transformers appends on every save when several exist; take the latest
            stored = stored[-1] if stored else None
        if isinstance(stored, dict):
            return (stored.get("attributes") or {}).get("resume_state")
        return None

    # events ------------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if model is None or optimizer is None:
            raise ValueError("AlphaDecayCallback needs the Trainer's model and optimizer at on_train_begin")
        resuming = state.global_step > 0
        saved = self._saved_state(state) if resuming else self._pending  # a state given by load_state_dict
        self._pending = None
        self.load_state_dict(saved)
        self.attach(optimizer, model)
        if resuming and saved is None:
            warnings.warn(
                f"AlphaDecayCallback: resuming at step {state.global_step} without a saved AlphaDecay state in "
                "the checkpoint; decays were recomputed from the current weights and the step count set to "
                "the global step",
                stacklevel=2,
            )
            self.decay.step = int(state.global_step)
            self.decay.last_update_step = self.decay.step
        # A checkpoint written without this callback has no entry for it; the Trainer would fail (KeyError) at
        # its next save, so register ours now.
        sc = getattr(state, "stateful_callbacks", None)
        if isinstance(sc, dict) and type(self).__name__ not in sc:
            sc[type(self).__name__] = self.state()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if self.decay is None or logs is None:
            return
        items = self.log_items()
        logs.update(items)
        hist = getattr(state, "log_history", None)
        if hist and hist[-1].get("step") == state.global_step:
            hist[-1].update(items)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.decay is not None:
            self.decay.remove()  # decays stay set; the controller stays readable


# ---------------------------------------------------------------------------------------- multipliers


class MultiplierClipCallback(TrainerCallback):
    """Global-norm gradient clipping that leaves learnable multipliers out (LRM paper's recipe).

    Runs at ``on_pre_optimizer_step`` (after gradient accumulation, before ``optimizer.step``) with
    :func:`layerwise.clip_grad_norm_` ``(model.parameters(), max_norm, exclude=multipliers)``; with
    ``clip_excluded`` the multipliers are clipped separately to that norm.  Requires
    ``TrainingArguments(max_grad_norm=0)`` (otherwise the Trainer already clipped everything together) and no
    fp16 ``GradScaler`` (gradients would still be scaled); ``ValueError`` at ``on_train_begin`` otherwise.
    The last total norm is kept in ``last_norm`` (a 0-d tensor, no host sync).
    """

    def __init__(self, max_norm: float, clip_excluded: float | None = None) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
            raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
        self.max_norm = float(max_norm)
        self.clip_excluded = clip_excluded
        self.last_norm: torch.Tensor | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "max_grad_norm", 0) and args.max_grad_norm > 0:
            raise ValueError(
                f"MultiplierClipCallback: TrainingArguments.max_grad_norm={args.max_grad_norm} makes the Trainer clip "
                "every gradient (multipliers included) first; set max_grad_norm=0"
            )
        if getattr(args, "fp16", False):
            raise ValueError("MultiplierClipCallback does not support fp16 (GradScaler-scaled gradients); use bf16")

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        from layerwise.names import is_multiplier
        from layerwise.optim.clip import clip_grad_norm_

        if model is None:
            return
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        mults = [p for n, p in named if is_multiplier(n)]
        self.last_norm = clip_grad_norm_(
            [p for _, p in named], self.max_norm, exclude=mults, clip_excluded=self.clip_excluded
        )


def move_callback_first(trainer: Any, callback: Any) -> None:
    """Put ``callback`` (an instance or a class already added) first in ``trainer.callback_handler`` so that
    the keys it adds to ``logs`` in ``on_log`` reach the reporting integrations (TensorBoard, W&B ...),
    which the Trainer places before user callbacks.  ``ValueError`` if the Trainer does not hold it."""
    cbs = trainer.callback_handler.callbacks
    for i, cb in enumerate(cbs):
        if cb is callback or (isinstance(callback, type) and type(cb) is callback):
            cbs.insert(0, cbs.pop(i))
            return
    raise ValueError(f"the Trainer has no callback {callback!r}; add it with callbacks=[...] first")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every multiplier folded into its weight (``r[:, None]·W·c·s``) and the
    multiplier entries removed; the model is not changed.

    Raises ``ValueError`` when a multiplied weight is shared with another module (tied embeddings with a
    multiplied ``embed_tokens``): a plain model re-ties the two on load, so the export could not be exact.
    """
    from layerwise.multipliers import (
        MultipliedConv1D,
        MultipliedEmbedding,
        MultipliedLinear,
        merge_multipliers_state_dict,
    )

    users: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        w = mod.__dict__.get("_parameters", {}).get("weight")
        if isinstance(w, torch.Tensor):
            users.setdefault(id(w), []).append(mname)
    for mname, mod in model.named_modules():
        if isinstance(mod, (MultipliedLinear, MultipliedConv1D, MultipliedEmbedding)):
            shared = [u for u in users.get(id(mod.weight), []) if u != mname]
            if shared:
                raise ValueError(
                    f"the weight of {mname!r} carries multipliers and is tied to {shared}; merging cannot be exact "
                    "(a plain model would re-tie them on load). Untie the weights (tie_word_embeddings=False) or "
                    "add multipliers with a placement that skips this module"
                )
    return merge_multipliers_state_dict(model.state_dict())


def save_merged(model: nn.Module, path: str | os.PathLike, **save_pretrained_kwargs: Any) -> None:
    """``model.save_pretrained(path, state_dict=merged_state_dict(model))``: a checkpoint without multipliers
    that loads into the plain architecture (``LlamaForCausalLM.from_pretrained(path)``) with the same outputs.

    The model keeps its multipliers (training can go on); to merge in place instead use
    :func:`layerwise.merge_multipliers` and ``save_pretrained``.  ``save_pretrained_kwargs`` are passed on
    (``safe_serialization``, ``max_shard_size`` ...); ``state_dict`` may not be among them.
    """
    if "state_dict" in save_pretrained_kwargs:
        raise TypeError("save_merged builds the state_dict itself; do not pass state_dict=")
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_merged needs a transformers PreTrainedModel, got {type(model).__name__}")
    from layerwise.scaling.model_side import applied

    mup = applied(model)
    if mup is not None and not mup.folded and (mup.hooks or mup.scaling):
        raise ValueError(
            "save_merged: WidthScaling.apply_ attached a readout multiplier / attention scale to this model that a "
            "checkpoint would not carry (hooks and module attributes are not saved); call rule.fold_(model) "
            "first to fold them into the weights"
        )
    save_pretrained = getattr(model, "save_pretrained")  # noqa: B009 - a transformers method nn.Module does not type
    save_pretrained(os.fspath(path), state_dict=merged_state_dict(model), **save_pretrained_kwargs)
