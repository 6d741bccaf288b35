"""The method registry: how a config turns into optimizer, weight-decay controller and model transform, and
the named methods that ``layerwise compare`` runs (each a bundle of config overrides).

The method issues extend the three builder tables and :data:`METHODS`; the trainer only calls
:func:`build_optimizer`, :func:`build_decay` and :func:`transform_model`.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from layerwise.lab.config import Config, ConfigError


# --------------------------------------------------------------------------------------- optimizers
def _optimizer_options(name: str, cfg: Config) -> dict[str, Any]:
    """The config's optimizer-specific options (the common lr/betas/eps/weight_decay are mapped by the
    registry, :mod:`layerwise.optim.registry`)."""
    o = cfg.optim
    if name in ("adamw", "adam"):
        return {"fused": True} if o.fused else {}
    if name == "alphaadam":
        return dict(
            mask_ref=o.mask_ref, alpha_mode=o.alpha_mode, alpha_max=o.alpha_max, floor=o.floor, alpha_lag=o.alpha_lag
        )
    if name == "cautious":
        return dict(alpha_lag=o.alpha_lag)
    if name == "muon":  # Muon's own lr on the matrices; the AdamW half keeps optim.lr
        return dict(momentum=o.muon_momentum, adam_lr=o.lr)
    return {}


def width_rule(cfg: Config, model_cfg, model: nn.Module | None = None) -> Any:
    """The :class:`layerwise.WidthScaling` rule of a muP run, else None: for a Hugging Face model, the
    per-tensor rule its build applied (:func:`layerwise.lab.hf_models.build_hf_model`); for the reference
    model, the global rule of its hidden sizes."""
    if cfg.model.parametrization != "mup":
        return None
    from layerwise.scaling import WidthScaling
    from layerwise.scaling.model_side import applied

    state = applied(model) if model is not None else None
    if state is not None:
        return state.rule

    return WidthScaling(
        base_width=model_cfg.base_hidden_size,
        width=model_cfg.hidden_size,
        lr_exponent=cfg.optim.lr_exponent,
        wd_exponent=cfg.optim.wd_exponent,
    )


def build_param_groups(model: nn.Module, cfg: Config, model_cfg) -> list[dict]:
    """The run's parameter groups; with one group per controlled matrix when the configured decay controller
    sets per-matrix decays (the layout it needs: controllers never regroup an optimizer)."""
    from layerwise.decay import per_matrix_for
    from layerwise.optim import param_groups

    name, opts = decay_options(cfg)
    return param_groups(
        model,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        scaling=width_rule(cfg, model_cfg, model),
        multiplier_weight_decay=cfg.optim.multiplier_weight_decay,
        multiplier_lr_scale=cfg.optim.multiplier_lr_scale,
        per_matrix=False if name == "none" else per_matrix_for(name, **opts),
    )


def build_optimizer(model: nn.Module, cfg: Config, model_cfg, device: str):
    from layerwise.optim import registry

    try:
        name = registry.canonical_name(cfg.optim.name, field="optim.name")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    o = cfg.optim
    lr = (o.muon_lr or o.lr) if name == "muon" else o.lr
    return registry.build(
        name,
        build_param_groups(model, cfg, model_cfg),
        lr=lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        **_optimizer_options(name, cfg),
    )


# ------------------------------------------------------------------------------------ decay control
def decay_options(cfg: Config) -> tuple[str, dict[str, Any]]:
    """The configured controller's name (``"none"`` or a name of :data:`layerwise.decay.DECAY_CONTROLLERS`,
    the one registry of controller names) and its constructor options."""
    from layerwise.decay import DECAY_CONTROLLERS

    d = cfg.decay
    if d.name != "none" and d.name not in DECAY_CONTROLLERS:
        raise ConfigError(
            f"decay.name: unknown controller {d.name!r}; choose one of {['none', *sorted(DECAY_CONTROLLERS)]}"
        )
    opts: dict[str, Any] = {}
    if d.name == "alphadecay":
        opts = {k: getattr(d, k) for k in _ALPHADECAY_OPTIONS}
        opts["ema"] = d.ema or None  # 0 in the config: no EMA
    elif d.name == "typedecay":
        opts = dict(attention=d.s1, mlp=d.s2)
    elif d.name == "adadecay":
        opts = dict(interval=d.interval, slope=d.slope, norm=d.adadecay_norm, modules=d.modules)
    elif d.name == "awd":
        opts = dict(lambda_awd=_lambda_awd(d.lambda_awd))
    return d.name, opts


def build_decay(optimizer, model: nn.Module, cfg: Config):
    """The configured controller (:func:`decay_options`), or None for ``decay.name = "none"``."""
    from layerwise.decay import build_decay as _build

    name, opts = decay_options(cfg)
    if name == "none":
        return None
    try:
        return _build(name, optimizer, model, **opts)
    except ValueError as e:
        raise ConfigError(f"decay ({name}): {e}") from None


#: [decay] keys passed to AlphaDecay under the same names (and ``ema``, where 0 means None)
_ALPHADECAY_OPTIONS = (
    "interval",
    "s1",
    "s2",
    "estimator",
    "preserve_mean",
    "shape_correction",
    "modules",
    "metric",
    "assign",
    "timing",
    "slope",
)


def _lambda_awd(value: str):
    if value == "calibrate":
        return None
    if value == "authors":
        return "authors"
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"decay.lambda_awd: expected 'calibrate', 'authors' or a number, got {value!r}") from None


# ------------------------------------------------------------------------------- model transforms
def transform_model(model: nn.Module, cfg: Config) -> list[nn.Parameter]:
    """Apply the configured model transforms (learnable multipliers); returns parameters to exclude from the
    gradient-clipping norm."""
    if cfg.multipliers.kind == "none":
        return []
    from layerwise.multipliers import add_multipliers

    return add_multipliers(model, kind=cfg.multipliers.kind, placement=cfg.multipliers.placement)


# ------------------------------------------------------------------------------ compare's methods
#: Named methods for ``layerwise compare``: each is a set of config overrides on top of the preset.
#: ``a+b`` combines registered methods; ``name[section.key=value,...]`` adds overrides (e.g. a tuned
#: uniform decay: ``adamw[optim.weight_decay=0.05]``).
METHODS: dict[str, dict[str, Any]] = {
    "adamw": {},
    "adamw-nowd": {"optim.weight_decay": 0.0},
    "alphadecay": {"decay.name": "alphadecay"},
    # the authors' module set (first and last nn.Linear out, biases with their module, the rest at wd0, the
    # < 50-eigenvalue rule) and their loop (recompute before every interval-th step)
    "alphadecay-authors": {"decay.name": "alphadecay", "decay.modules": "authors", "decay.timing": "before"},
    "typedecay": {"decay.name": "typedecay"},
    "awd": {"decay.name": "awd"},
    "adadecay": {"decay.name": "adadecay"},
    "alphaadam": {"optim.name": "alphaadam"},
    "cautious": {"optim.name": "cautious"},
    "multipliers": {"multipliers.kind": "rowcol", "multipliers.placement": "paper"},
    "muon": {"optim.name": "muon"},
    # muP + sqrt(d) weight decay with the base width at a quarter of the model's width: the base lr/wd are
    # the ones tuned for the narrow proxy.
    "scaling": {"model.parametrization": "mup", "model.base_hidden_size": -4, "optim.wd_exponent": 0.5},
}
#: What ``layerwise demo`` compares (one seed each).
DEMO_METHODS = ("adamw", "alphadecay", "alphaadam", "cautious", "multipliers", "muon", "scaling")

_METHOD_RE = re.compile(r"^(?P<name>[\w\-+]+)(?:\[(?P<over>[^\]]*)\])?$")


def method_overrides(spec: str) -> dict[str, Any]:
    """Config overrides for a method spec such as ``alphadecay``, ``muon+multipliers`` or
    ``adamw[optim.weight_decay=0.05]``."""
    from layerwise.lab.config import parse_override

    m = _METHOD_RE.match(spec.strip())
    if not m:
        raise ConfigError(f"method {spec!r}: expected NAME, NAME+NAME or NAME[section.key=value,...]")
    out: dict[str, Any] = {}
    for part in m.group("name").split("+"):
        if part not in METHODS:
            raise ConfigError(f"unknown method {part!r} in {spec!r}; registered: {sorted(METHODS)}")
        out.update(METHODS[part])
    if m.group("over"):
        for item in m.group("over").split(","):
            s, k, v = parse_override(item)
            out[f"{s}.{k}"] = v
    return out


def resolve_relative_widths(cfg: Config, hidden_size: int) -> None:
    """``model.base_hidden_size < 0`` means ``hidden_size / |value|`` (used by the ``scaling`` method)."""
    if cfg.model.base_hidden_size < 0:
        div = -cfg.model.base_hidden_size
        if hidden_size % div:
            raise ConfigError(f"model.base_hidden_size=-{div}: hidden size {hidden_size} is not divisible by {div}")
        cfg.model.base_hidden_size = hidden_size // div


# ------------------------------------------------------------------------------------ diagnostics
def _null():
    import contextlib

    return contextlib.nullcontext()


class Diagnostics:
    """Method-specific numbers the trainer logs: AlphaAdam mask density / alpha, multiplier norms and the q/k
    multiplier ratio, sub-layer gains (muP runs), the decay controller's per-module table and spectra."""

    def __init__(self, model: nn.Module, optimizer, decay, cfg: Config):
        self.model, self.optimizer, self.decay, self.cfg = model, optimizer, decay, cfg
        self._decay_version = None

    def scalars(self, batch: torch.Tensor | None = None, autocast=None) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.cfg.multipliers.kind != "none" and batch is not None:
            out.update(residual_rms(self.model, batch, autocast))
        if self.cfg.model.parametrization == "mup" and batch is not None:
            from layerwise.scaling import SublayerGains, top_sv_metrics

            was = self.model.training
            self.model.eval()
            with torch.no_grad(), SublayerGains(self.model) as gains, autocast() if autocast else _null():
                self.model(batch)
            self.model.train(was)
            out.update({k: v for k, v in gains.metrics().items() if k.endswith("mean")})
            out.update({k: v for k, v in top_sv_metrics(self.model).items() if k.endswith("/mean")})
        diag = getattr(self.optimizer, "diagnostics", None)
        if callable(diag):
            stats = diag()
            if stats:
                for key in ("mask_density", "alpha"):
                    vals = [float(v[key]) for v in stats.values() if key in v]
                    if vals:
                        out[f"{self.cfg.optim.name}/{key}_mean"] = sum(vals) / len(vals)
                        out[f"{self.cfg.optim.name}/{key}_min"] = min(vals)
                        out[f"{self.cfg.optim.name}/{key}_max"] = max(vals)
        if self.cfg.multipliers.kind != "none":
            from layerwise.multipliers import multiplier_stats

            out.update({f"mult/{k}": float(v) for k, v in multiplier_stats(self.model).items()})
        return out

    def log_decay(self, path, step: int, log_step: bool = True) -> None:
        """Append the controller's per-module table to spectral.jsonl whenever it was recomputed (for
        controllers that change every step, AWD and AdaDecay, only on logging steps)."""
        version = getattr(self.decay, "version", None)
        if version is None or version == self._decay_version:
            return
        if getattr(self.decay, "interval", None) == 1 and not log_step:
            return
        self._decay_version = version
        rows = [
            {k: (float(v) if isinstance(v, (float, torch.Tensor)) else v) for k, v in r.items()}
            for r in self.decay.table()
        ]
        import json
        import math

        rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "kind": "decay", "controller": self.cfg.decay.name, "rows": rows}) + "\n")

    def log_spectral(self, path, step: int) -> None:
        import json

        from layerwise.spectral import analyze

        rep = analyze(self.model)
        rows = json.loads(rep.to_json())
        rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "kind": "analyze", "rows": rows}) + "\n")


@torch.no_grad()
def residual_rms(model: nn.Module, batch: torch.Tensor, autocast=None) -> dict[str, float]:
    """RMS of the residual stream after each transformer block (one extra forward on ``batch``)."""
    rms: list[torch.Tensor] = []
    hooks = [
        blk.register_forward_hook(lambda m, a, out: rms.append(out.float().pow(2).mean().sqrt()))
        for blk in getattr(model, "layers", [])
    ]
    was = model.training
    model.eval()
    try:
        with autocast() if autocast else _null():
            model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if not rms:
        return {}
    vals = torch.stack(rms).tolist()
    return {"resid_rms/last": vals[-1], "resid_rms/mean": sum(vals) / len(vals)}
