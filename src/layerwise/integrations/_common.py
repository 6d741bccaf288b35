"""Framework-independent pieces shared by the Hugging Face and Lightning integrations.

* :func:`build_optimizer` builds a layerwise optimizer for a model: :func:`layerwise.param_groups` (canonical
  names, width scaling, a multiplier group, no decay on norms/biases, and by default one group per block matrix,
  ``per_matrix=True``, the layout :class:`layerwise.AlphaDecay` needs) fed to an optimizer of the registry
  :mod:`layerwise.optim.registry`.  Controllers never regroup an optimizer, so a controller attached later
  (after the framework has created its LR scheduler, or loaded a checkpoint) finds the layout it needs.
* :class:`DecayCallbackBase`: what both frameworks' ``AlphaDecayCallback`` share — the controller's options,
  attaching it to the (unwrapped) optimizer, its state (exactly ``AlphaDecay.state_dict()``), log items.

Weight decay is PyTorch's coupled convention: one step does ``θ ← θ·(1 − lr·λ)`` (decoupled optimizers) or
adds ``λ·θ`` to the gradient (torch ``Adam``).

This module imports neither ``transformers`` nor ``lightning``, and never ``layerwise.lab``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from layerwise.decay import GroupLayoutError, PerMatrix
from layerwise.optim import registry as _registry

__all__ = [
    "OPTIMIZERS",
    "build_optimizer",
    "optimizer_kwargs",
    "check_optimizer_options",
    "unwrap_optimizer",
    "decay_log_items",
    "DecayCallbackBase",
]

#: optimizer names accepted by :func:`build_optimizer` (the registry :mod:`layerwise.optim.registry`)
OPTIMIZERS = tuple(_registry.OPTIMIZERS)

#: arguments of earlier versions, and what replaced them
_REPLACED = {
    "split_matrices": "per_matrix=True / False",
    "decay_select": "per_matrix=<the controller's select>",
}


def check_optimizer_options(name: str, lr: float, weight_decay: float, betas: Sequence[float], eps: float) -> None:
    """Eager validation of the arguments of :func:`build_optimizer` (``ValueError`` naming the field)."""
    _registry.canonical_name(name)  # ValueError naming the choices
    for field, value in (("lr", lr), ("weight_decay", weight_decay), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{field} must be a non-negative finite number, got {value!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= float(b) < 1.0 for b in betas)):
        raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")


def build_optimizer(
    model: nn.Module,
    name: str = "alphaadam",
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    *,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    scaling: Any = None,
    multiplier_weight_decay: float = 2e-3,
    multiplier_lr_scale: float = 1.0,
    no_decay: Sequence[str] = ("norm", "bias", "multiplier"),
    per_matrix: PerMatrix = True,
    **optimizer_options: Any,
) -> torch.optim.Optimizer:
    """A layerwise optimizer for ``model``, ready for a weight-decay controller attached later.

    Args:
        model: the model to optimise (its trainable parameters; canonical names).  Add multipliers
            (:func:`layerwise.add_multipliers`) *before* calling this.
        name: a name of the optimizer registry (:data:`layerwise.optim.registry.OPTIMIZERS`): ``"alphaadam"``
            (:class:`layerwise.AlphaAdam`), ``"cautious"`` (:class:`layerwise.CautiousAdamW`), ``"adamw"``
            (``torch.optim.AdamW``), ``"adam"`` (``torch.optim.Adam``, coupled L2 — the AlphaDecay paper's main
            table) or ``"muon"`` (:class:`layerwise.optim.MuonAdamW`).
        lr, weight_decay: base learning rate and weight decay λ (PyTorch's coupled convention
            ``θ ← θ·(1 − lr·λ)``); groups scale them (width scaling, multipliers, no-decay tokens).
        betas, eps: Adam hyper-parameters.
        scaling: a :class:`layerwise.WidthScaling` or ``None``.
        multiplier_weight_decay, multiplier_lr_scale, no_decay: as in :func:`layerwise.param_groups`.
        per_matrix: as in :func:`layerwise.param_groups`: ``True`` (default) gives every block matrix a group of
            its own, the layout :class:`layerwise.AlphaDecay` (default options) needs; ``"authors"`` for
            ``modules="authors"``, the controller's ``select`` for a selection; ``False`` when no controller
            will be attached (a few fewer kernel launches per step for ``foreach`` optimizers).
        **optimizer_options: passed to the optimizer class (``mask_ref``, ``alpha_mode``, ``alpha_max``,
            ``floor``, ``masking``, ``fast`` for AlphaAdam; ``fused``/``foreach`` for torch's).

    Returns:
        The optimizer.  Every group carries ``params``, ``lr``, ``weight_decay``, ``param_names`` (canonical
        names) and ``group`` (a label); torch optimizers accept the extra keys.
    """
    from layerwise.optim.groups import param_groups

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    old = sorted(set(optimizer_options) & set(_REPLACED))
    if old:
        raise TypeError(f"build_optimizer: {old} were replaced by " + ", ".join(_REPLACED[k] for k in old))
    check_optimizer_options(name, lr, weight_decay, betas, eps)
    groups = param_groups(
        model,
        lr=lr,
        weight_decay=weight_decay,
        scaling=scaling,
        multiplier_weight_decay=multiplier_weight_decay,
        multiplier_lr_scale=multiplier_lr_scale,
        no_decay=no_decay,
        per_matrix=per_matrix,
    )
    b1, b2 = betas
    return _registry.build(name, groups, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, **optimizer_options)


def optimizer_kwargs(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments of :func:`build_optimizer` (all but ``model``) with its defaults filled in, checked
    now (``TypeError`` for a misplaced argument, ``ValueError`` naming a bad value), so that a factory fails when
    it is configured rather than when training starts.  Optimizer-specific options stay flat in the result."""
    try:
        bound = inspect.signature(build_optimizer).bind(None, **kwargs)
    except TypeError as e:
        raise TypeError(f"build_optimizer: {e}") from None
    bound.apply_defaults()
    out = {k: v for k, v in bound.arguments.items() if k not in ("model", "optimizer_options")}
    out.update(bound.arguments.get("optimizer_options", {}))
    check_optimizer_options(out["name"], out["lr"], out["weight_decay"], out["betas"], out["eps"])
    return out


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost ``torch.optim.Optimizer`` of a wrapper chain (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer`` ...): step hooks must be registered on the optimizer whose ``step``
    actually runs."""
    seen = 0
    while seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
        seen += 1
    if not (hasattr(optimizer, "param_groups") and hasattr(optimizer, "register_step_post_hook")):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer


def decay_log_items(table: list[dict], prefix: str = "alphadecay", per_module: bool = True) -> dict[str, float]:
    """Flatten a controller's ``table()`` into scalar log entries.

    Keys: ``{prefix}/alpha_mean|alpha_min|alpha_max`` (over finite α), ``{prefix}/weight_decay_mean|_min|_max``
    and, with ``per_module``, ``{prefix}/alpha/{name}`` and ``{prefix}/weight_decay/{name}`` per analysed
    matrix (``alpha`` is NaN where the estimate was not finite).
    """
    out: dict[str, float] = {}
    alphas = [r["alpha"] for r in table if r.get("alpha") is not None]
    decays = [float(r["weight_decay"]) for r in table]
    if alphas:
        out[f"{prefix}/alpha_mean"] = sum(alphas) / len(alphas)
        out[f"{prefix}/alpha_min"] = min(alphas)
        out[f"{prefix}/alpha_max"] = max(alphas)
    if decays:
        out[f"{prefix}/weight_decay_mean"] = sum(decays) / len(decays)
        out[f"{prefix}/weight_decay_min"] = min(decays)
        out[f"{prefix}/weight_decay_max"] = max(decays)
    if per_module:
        for r in table:
            a = r.get("alpha")
            out[f"{prefix}/alpha/{r['name']}"] = float("nan") if a is None else float(a)
            out[f"{prefix}/weight_decay/{r['name']}"] = float(r["weight_decay"])
    return out


class DecayCallbackBase:
    """The framework-independent half of the ``AlphaDecayCallback`` of :mod:`layerwise.integrations.hf` and
    :mod:`layerwise.integrations.lightning`.

    Args:
        interval: optimizer steps between recomputations of α (as :class:`layerwise.AlphaDecay`).
        log_per_module: log ``{prefix}/alpha/{name}`` and ``{prefix}/weight_decay/{name}`` (the summary
            ``{prefix}/alpha_mean|min|max`` and ``{prefix}/weight_decay_mean|min|max`` are always logged).
        prefix: log-key prefix.
        **options: further keyword arguments of :class:`layerwise.AlphaDecay` (``s1``, ``s2``, ``wd0``,
            ``estimator``, ``preserve_mean``, ``ema``, ``shape_correction``, ``select``, ``modules``, ``metric``,
            ``assign``, ``timing`` ...); an unknown one is a ``ValueError`` now.

    The callback's state is exactly the controller's :meth:`~layerwise.AlphaDecay.state_dict` (``{}`` before
    the controller exists); a state loaded before the controller is built is kept and loaded into it when it
    is.  :attr:`per_matrix` is the ``per_matrix`` argument the optimizer's groups must have been built with.

    Attributes:
        decay: the :class:`layerwise.AlphaDecay` (``None`` before training starts); ``decay.table()`` gives
            ``[{"name", "alpha", "weight_decay", ...}]``.
    """

    #: how the framework's users build an optimizer with the layout the controller needs (error messages)
    layout_advice = "build the optimizer with layerwise.integrations build_optimizer(model, ..., per_matrix={})"

    def __init__(
        self, interval: int = 500, *, log_per_module: bool = True, prefix: str = "alphadecay", **options: Any
    ) -> None:
        from layerwise.decay import check_options

        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        check_options("alphadecay", options)
        self.options: dict[str, Any] = {"interval": interval, **options}
        self.log_per_module = bool(log_per_module)
        self.prefix = str(prefix)
        self.decay: Any = None
        self._pending: dict | None = None

    @property
    def per_matrix(self) -> PerMatrix:
        """The ``per_matrix`` argument of :func:`layerwise.param_groups` / :func:`build_optimizer` whose layout the
        controller needs."""
        from layerwise.decay import AlphaDecay

        return AlphaDecay.per_matrix_for(**self.options)

    # state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``AlphaDecay.state_dict()`` of the controller (the pending state, or ``{}``, before it exists)."""
        if self.decay is not None:
            return self.decay.state_dict()
        return dict(self._pending or {})

    def load_state_dict(self, state_dict: dict[str, Any] | None) -> None:
        """Keep ``AlphaDecay.state_dict()`` until the controller is built (an empty state is ignored)."""
        if not state_dict:
            return
        if not isinstance(state_dict, dict) or "names" not in state_dict or "step" not in state_dict:
            old = isinstance(state_dict, dict) and "controller" in state_dict and "wd0" in state_dict
            raise ValueError(
                f"{type(self).__name__}: the saved state is not an AlphaDecay.state_dict()"
                + (
                    " (it is the {'controller', 'wd0'} payload that layerwise's callbacks wrote before the "
                    "optimizer layout changed to param_groups(per_matrix=...); such a checkpoint cannot be "
                    "resumed by this version)"
                    if old
                    else f"; got keys {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)}"
                )
            )
        self._pending = dict(state_dict)

    # the controller ----------------------------------------------------------------------------------
    def attach(self, optimizer: Any, model: nn.Module) -> Any:
        """Build the controller on ``optimizer`` (unwrapped) and ``model``, then load a pending state."""
        from layerwise.decay import AlphaDecay

        if self.decay is not None:  # a second fit / train(): detach the old controller
            self.decay.remove()
            self.decay = None
        opt = unwrap_optimizer(optimizer)
        try:
            self.decay = AlphaDecay(opt, model, **self.options)
        except GroupLayoutError as e:
            advice = self.layout_advice.format(repr(self.per_matrix))
            raise GroupLayoutError(f"{type(self).__name__}: {e}  With this framework: {advice}.") from None
        saved, self._pending = self._pending, None
        if saved is not None:
            self.decay.load_state_dict(saved)
        return self.decay

    def log_items(self) -> dict[str, float]:
        """The controller's α and λ as scalar log entries (:func:`decay_log_items`) plus ``{prefix}/version``."""
        items = decay_log_items(self.decay.table(), self.prefix, self.log_per_module)
        items[f"{self.prefix}/version"] = float(self.decay.version)
        return items
