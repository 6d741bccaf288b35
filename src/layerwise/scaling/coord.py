"""Coordinate check (mup's visual test of a width parametrisation).

Train a model at several widths for a few steps and record the RMS of activations at a few sites before each
update.  Under a correct μP, every site's RMS is (nearly) independent of width at every step: plotted against
width, each step's curve is flat.  Under the standard parametrisation with a fixed LR, activations after the
first updates grow with width.

Sites (RMS over all elements of the batch): ``embedding`` (the token embedding's output; in a model without
one, the output of its input layers: anatomy role ``input``), ``attn`` and ``mlp`` (sub-layer outputs added to
the residual, averaged over blocks), ``residual`` (output of the last block), ``hidden`` (in a model without
transformer blocks: the outputs of its other matrix layers, averaged), ``logits`` (the model output, after
any readout multiplier).

Inputs: random token ids by default (a language model), or ``input_shape`` (standard-normal features of that
shape per sample, random class targets), or any ``batch_fn(step) -> (inputs, targets)``.  With
``fix_data=True`` every step sees the first step's batch (mup's ``get_coord_data`` default): each update is
then aligned with the next input, the regime μP's scaling argument describes.  With fresh random batches
(the default here) an update is mostly unaligned with the next batch's independent random tokens, and that
part of a sub-layer's output change shrinks as ``1/sqrt(width)`` under μP, so narrow μP models drift a
little higher than wide ones over the first steps (negative slopes that flatten with width).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise.scaling.diagnostics import _output_tensor, transformer_blocks
from layerwise.scaling.rules import WidthScaling

__all__ = ["CoordCheckResult", "coord_check", "plot_coord_check", "SITES"]

SITES: tuple[str, ...] = ("embedding", "attn", "mlp", "residual", "hidden", "logits")


@dataclass
class CoordCheckResult:
    """``rms[site][width][step]`` and ``loss[width][step]`` (step t = before the t-th update)."""

    widths: list[int]
    steps: int
    rms: dict[str, dict[int, list[float]]]
    loss: dict[int, list[float]]
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def slope(self, site: str, step: int, widths: Sequence[int] | None = None) -> float:
        """Least-squares slope of log2 RMS against log2 width at one step (0 = width-invariant; 1 = RMS ∝ width),
        over all recorded widths or the given subset (e.g. the widest pair)."""
        if site not in self.rms:
            raise KeyError(f"unknown site {site!r}; recorded sites: {sorted(self.rms)}")
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} out of range [0, {self.steps})")
        ws = list(self.widths if widths is None else widths)
        unknown = set(ws) - set(self.widths)
        if unknown:
            raise KeyError(f"width(s) {sorted(unknown)} not recorded; widths: {self.widths}")
        xs = [math.log2(w) for w in ws]
        ys = [math.log2(self.rms[site][w][step]) for w in ws]
        xm, ym = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - xm) ** 2 for x in xs)
        return sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per (width, step): ``{"width", "step", "loss", <site>: rms ...}``."""
        rows = []
        for w in self.widths:
            for t in range(self.steps):
                row: dict[str, Any] = {"width": w, "step": t, "loss": self.loss[w][t]}
                row.update({s: self.rms[s][w][t] for s in self.rms})
                rows.append(row)
        return rows


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"coord_check: cannot find logits in the model output of type {type(out).__name__}")


def _resolve_scaling(
    parametrization: str | Callable[[int], WidthScaling | None] | None, width: int, base_width: int
) -> WidthScaling | None:
    if parametrization is None:
        return None
    if callable(parametrization):
        rule = parametrization(width)
        if rule is not None and not isinstance(rule, WidthScaling):
            raise TypeError(f"coord_check: parametrization({width}) returned {type(rule).__name__}, not WidthScaling")
        return rule
    return WidthScaling.from_parametrization(parametrization, base_width, width)


def _site_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules whose outputs make each site (see the module docstring); ``logits`` is the model output."""
    an = _anatomy.anatomy(model)
    sites: dict[str, list[nn.Module]] = {s: [] for s in SITES}
    tokens = an.where("embedding", operator="token")
    if tokens:
        sites["embedding"].append(an.module(tokens[0].module))
    else:
        sites["embedding"] += [an.module(r.module) for r in an.where("input")]
    try:
        blocks = transformer_blocks(model)
    except ValueError:
        blocks = []
    for b in blocks:
        if b.attn is not None:
            sites["attn"].append(b.attn)
        if b.mlp is not None:
            sites["mlp"].append(b.mlp)
    if blocks:
        sites["residual"].append(blocks[-1].block)
    else:
        skip = {id(m) for m in sites["embedding"]}
        for r in an.where(("block_matrix", "matrix")):
            mod = an.module(r.module)
            if id(mod) not in skip:
                skip.add(id(mod))
                sites["hidden"].append(mod)
    return sites


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def coord_check(
    widths: Sequence[int],
    build_fn: Callable[[int], nn.Module | tuple[nn.Module, WidthScaling | None]],
    steps: int = 4,
    *,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    parametrization: str | Callable[[int], WidthScaling | None] | None = "sp",
    base_width: int | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    optimizer_kwargs: dict[str, Any] | None = None,
    batch_size: int = 4,
    seq_len: int = 16,
    vocab_size: int | None = None,
    input_shape: Sequence[int] | None = None,
    batch_fn: Callable[[int], tuple[Any, torch.Tensor]] | None = None,
    fix_data: bool = False,
    seed: int = 0,
    label: str = "",
) -> CoordCheckResult:
    """Record activation RMS per step per width for ``steps`` optimizer steps.

    Args:
        widths: hidden sizes, e.g. ``[32, 64, 128]``.
        build_fn: ``width -> model`` or ``width -> (model, rule)``.  The model maps its inputs to logits (a
            tensor, a tuple whose first item is the logits, or an object with ``.logits``).  Build μP models
            here: either a model with μP built in, or ``rule = WidthScaling.from_models(model, base=...)``;
            ``rule.apply_(model)`` and return ``(model, rule)`` (the rule then builds the groups and
            ``parametrization`` is not used).
        steps: number of recorded forward passes; an update follows each one.
        lr, weight_decay: base hyper-parameters, passed to :func:`layerwise.param_groups`.
        parametrization: ``"sp"`` (no width scaling), ``"mup"``, ``"mup-sqrtwd"``, ``"mup-lrwd"``
            (:meth:`WidthScaling.from_parametrization` with ``base_width``), or ``width -> WidthScaling | None``.
        base_width: μP base width (default ``min(widths)``).
        optimizer_cls, optimizer_kwargs: the optimizer, built on the parameter groups.
        batch_size, seq_len, vocab_size: random-token batches (vocabulary: the token embedding's size by
            default); step t uses the same tokens at every width.
        input_shape: instead of tokens, inputs ``randn(batch_size, *input_shape)`` and targets uniform over the
            model's output classes (the last logits dimension), for models without an embedding.
        batch_fn: instead of either, ``step -> (inputs, targets)`` (inputs: a tensor, or a dict of keyword
            arguments); it must return the same batch at every width.  The loss is the cross-entropy of the
            logits (last dimension: classes) against integer targets of the logits' leading shape.
        fix_data: every step uses step 0's batch (mup's convention; see the module docstring).
        seed: seeds model construction (``torch.manual_seed(seed)`` before each ``build_fn``) and batches.
    """
    from layerwise.optim.groups import param_groups

    widths = [int(w) for w in widths]
    if not widths or any(w <= 0 for w in widths):
        raise ValueError(f"coord_check: widths must be a non-empty list of positive ints, got {widths!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"coord_check: steps must be a positive int, got {steps!r}")
    if input_shape is not None and batch_fn is not None:
        raise ValueError("coord_check: pass input_shape or batch_fn, not both")
    base = min(widths) if base_width is None else int(base_width)
    rms: dict[str, dict[int, list[float]]] = {s: {} for s in SITES}
    losses: dict[int, list[float]] = {}
    rules_from_build = False

    for width in widths:
        torch.manual_seed(seed)
        built = build_fn(width)
        if isinstance(built, tuple):
            model, rule = built
            rules_from_build = True
            if rule is not None and not isinstance(rule, WidthScaling):
                raise TypeError(f"coord_check: build_fn({width}) returned a {type(rule).__name__}, not a WidthScaling")
        else:
            model, rule = built, _resolve_scaling(parametrization, width, base)
        model.train()
        device = next(model.parameters()).device
        sites = _site_modules(model)
        vocab = None
        if input_shape is None and batch_fn is None:
            emb = sites["embedding"][0] if sites["embedding"] else None
            vocab = vocab_size or (emb.num_embeddings if isinstance(emb, nn.Embedding) else None)
            if vocab is None:
                raise ValueError(
                    "coord_check: pass vocab_size (the model has no nn.Embedding), input_shape or batch_fn"
                )
        groups = param_groups(model, lr, weight_decay, rule)
        opt = optimizer_cls(groups, lr=lr, **(optimizer_kwargs or {}))  # type: ignore[call-arg]

        sums: dict[str, list[torch.Tensor]] = {s: [] for s in SITES}

        def site_hook(site: str, store: dict[str, list[torch.Tensor]] = sums):
            def hook(module, args, output):
                y = _output_tensor(output)
                if y is not None:
                    store[site].append(y.detach().float().pow(2).mean().sqrt())

            return hook

        handles = [m.register_forward_hook(site_hook(s)) for s, mods in sites.items() for m in mods]
        per_step: dict[str, list[float]] = {s: [] for s in SITES}
        loss_w: list[float] = []
        try:
            for t in range(steps):
                b = 0 if fix_data else t  # which batch this step sees
                gen = torch.Generator().manual_seed(seed * 100003 + b)
                targets: torch.Tensor | None
                if batch_fn is not None:
                    inputs, targets = batch_fn(b)
                elif input_shape is not None:
                    inputs, targets = torch.randn(batch_size, *input_shape, generator=gen), None
                else:
                    assert vocab is not None
                    idx = torch.randint(vocab, (batch_size, seq_len + 1), generator=gen)
                    inputs, targets = idx[:, :-1], idx[:, 1:]
                if isinstance(inputs, torch.Tensor):
                    inputs = inputs.to(device)
                for s in sums:
                    sums[s].clear()
                logits = _logits_of(_call(model, inputs))
                sums["logits"].append(logits.detach().float().pow(2).mean().sqrt())
                if targets is None:
                    targets = torch.randint(logits.shape[-1], tuple(logits.shape[:-1]), generator=gen)
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1)
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                for s in SITES:
                    vals = sums[s]
                    per_step[s].append(float(torch.stack(vals).mean()) if vals else math.nan)
                loss_w.append(float(loss.detach()))
        finally:
            for h in handles:
                h.remove()
        for s in SITES:
            rms[s][width] = per_step[s]
        losses[width] = loss_w

    rms = {s: v for s, v in rms.items() if not all(math.isnan(x) for xs in v.values() for x in xs)}
    meta = {
        "lr": lr,
        "weight_decay": weight_decay,
        "base_width": base,
        "seed": seed,
        "fix_data": fix_data,
        "parametrization": "rules from build_fn"
        if rules_from_build
        else parametrization
        if isinstance(parametrization, str) or parametrization is None
        else getattr(parametrization, "__name__", "callable"),
    }
    return CoordCheckResult(widths, steps, rms, losses, label=label, meta=meta)


def plot_coord_check(result: CoordCheckResult, path: str, *, x: str = "width", title: str | None = None) -> str:
    """Save a coordinate-check figure (matplotlib, Agg backend) to ``path``; returns ``path``.

    ``x="width"`` (mup's layout): one panel per site, RMS against width (log-log), one line per step — flat
    lines mean width-invariant activations.  ``x="step"``: RMS against step, one line per width — the lines
    coincide under a width-invariant parametrisation.
    """
    if x not in ("width", "step"):
        raise ValueError(f"plot_coord_check: x must be 'width' or 'step', got {x!r}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    sites = list(result.rms)
    fig, axes = plt.subplots(1, len(sites), figsize=(3.2 * len(sites), 3.0), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, site in zip(axes[0], sites):
        if x == "width":
            for t in range(result.steps):
                ys = [result.rms[site][w][t] for w in result.widths]
                ax.plot(result.widths, ys, marker="o", color=cmap(t / max(1, result.steps - 1)), label=f"step {t}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width")
        else:
            for i, w in enumerate(result.widths):
                ax.plot(
                    range(result.steps),
                    result.rms[site][w],
                    marker="o",
                    color=cmap(i / max(1, len(result.widths) - 1)),
                    label=f"width {w}",
                )
            ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.set_title(site)
        ax.set_ylabel("RMS")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title if title is not None else (result.label or "coordinate check"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
