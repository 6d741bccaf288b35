"""Width-transfer diagnostics: sub-layer gains (via forward hooks) and top singular values per matrix.

Sub-layer gain (Fan et al., arXiv 2510.15262)
---------------------------------------------
In a pre-norm block ``h ← h + f(norm(h))`` the *sub-layer* is ``f ∘ norm`` (attention or MLP with the
norm in front of it).  Its gain is

    ``gain = RMS(f(norm(h))) / RMS(h)``

— the RMS of the sub-layer's output (the tensor added to the residual stream) over the RMS of the residual
stream entering the sub-layer (for attention: the block input; for the MLP: the residual after the attention
add).  RMS is over *all* elements the hooks saw (every token of every batch and every feature):
``RMS(x) = sqrt(Σ x² / numel)``.  Over several forward passes the sums accumulate, so ``gain`` is
``sqrt(Σ out² / Σ h²)`` (both tensors have the same number of elements).  ``gain_normed`` divides by the RMS of
the normed input ``norm(h)`` instead (the sub-layer module's own input), i.e. the gain of ``f`` alone.
If a block has no recognisable pre-norm module, ``gain`` falls back to ``gain_normed``.

Blocks and their attention / MLP sub-layers and pre-norms come from :meth:`layerwise.anatomy.Anatomy.blocks`
(the attention sub-layer is the module holding the block's q/k/v/o matrices, the MLP the one holding
gate/up/down) - our reference model, Hugging Face LLaMA, GPT-2, GPT-NeoX, Falcon-H1 (its attention and MLP;
the SSM mixer is not a sub-layer here) ...  Hooks accumulate on-device tensors (no host sync in a forward);
values are read when asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise.names import canonical_name

__all__ = ["SublayerGains", "SublayerGain", "transformer_blocks", "block_top_singular_values", "top_sv_metrics"]


@dataclass
class BlockParts:
    """The sub-modules of one transformer block that the diagnostics hook."""

    name: str
    layer: int
    block: nn.Module
    attn: nn.Module | None
    mlp: nn.Module | None
    attn_norm: nn.Module | None
    mlp_norm: nn.Module | None


def transformer_blocks(model: nn.Module) -> list[BlockParts]:
    """The blocks of a model with their attention / MLP / pre-norm modules (from :mod:`layerwise.anatomy`).

    Raises ``ValueError`` when no block has an attention or an MLP sub-layer.
    """
    blocks = []
    an = _anatomy.anatomy(model)
    for b in an.blocks():
        if b.attention is None and b.mlp is None:
            continue

        def get(name: str | None) -> nn.Module | None:
            return an.module(name) if name else None

        blocks.append(
            BlockParts(
                b.name, b.index, an.module(b.name), get(b.attention), get(b.mlp), get(b.attention_norm), get(b.mlp_norm)
            )
        )
    if not blocks:
        raise ValueError(
            f"no transformer blocks found in {type(model).__name__}: layerwise.anatomy finds no repeated block "
            "holding attention (q/k/v/o) or MLP (gate/up/down) matrices"
        )
    return blocks


def _first_tensor(args: tuple, kwargs: dict | None = None) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if kwargs:
        for key in ("hidden_states", "x", "input"):
            v = kwargs.get(key)
            if isinstance(v, torch.Tensor):
                return v
        for v in kwargs.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v
    return None


def _output_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _sumsq(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().pow(2).sum()


@dataclass
class SublayerGain:
    """One sub-layer's accumulated statistics (RMS over every element seen)."""

    name: str  # canonical module name, e.g. "layers.0.self_attn"
    layer: int
    kind: str  # "attn" | "mlp"
    gain: float  # RMS(out) / RMS(residual in)
    gain_normed: float  # RMS(out) / RMS(normed in)
    rms_in: float
    rms_normed_in: float
    rms_out: float


class _Acc:
    __slots__ = ("resid", "normed", "out", "n_resid", "n_normed", "n_out", "has_norm")

    def __init__(self, has_norm: bool) -> None:
        self.has_norm = has_norm
        self.reset()

    def reset(self) -> None:
        self.resid: torch.Tensor | float = 0.0
        self.normed: torch.Tensor | float = 0.0
        self.out: torch.Tensor | float = 0.0
        self.n_resid = self.n_normed = self.n_out = 0


class SublayerGains:
    """Forward hooks measuring RMS(out)/RMS(in) of every attention and MLP sub-layer (see the module docstring).

    Use as a context manager (hooks removed on exit, values kept)::

        with SublayerGains(model) as g:
            model(batch)
        g.metrics()   # {"gain/attn/0": ..., "gain/mlp/0": ..., "gain/attn/mean": ..., ...}

    or ``g = SublayerGains(model).attach()`` ... ``g.remove()``.  ``reset()`` clears the sums.  Statistics are
    taken under any grad mode; the hooks detach and add on-device, so they cost two reductions per sub-layer.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SublayerGains expects an nn.Module, got {type(model).__name__}")
        self.model = model
        self._blocks = transformer_blocks(model)
        self._handles: list[Any] = []
        self._acc: dict[str, tuple[BlockParts, str, _Acc]] = {}
        for b in self._blocks:
            for kind, sub, norm in (("attn", b.attn, b.attn_norm), ("mlp", b.mlp, b.mlp_norm)):
                if sub is None:
                    continue
                sub_name = next(canonical_name(n) for n, m in b.block.named_modules() if m is sub)
                self._acc[f"{b.name}.{sub_name}"] = (b, kind, _Acc(norm is not None))

    # -- hooks --------------------------------------------------------------------------------------
    def attach(self) -> SublayerGains:
        if self._handles:
            return self
        for key, (b, kind, acc) in self._acc.items():
            sub = b.attn if kind == "attn" else b.mlp
            norm = b.attn_norm if kind == "attn" else b.mlp_norm
            assert sub is not None  # only present sub-layers get an accumulator
            if norm is not None:
                self._handles.append(norm.register_forward_pre_hook(self._norm_hook(acc), with_kwargs=True))
            self._handles.append(sub.register_forward_hook(self._sub_hook(acc, key), with_kwargs=True))
        return self

    @staticmethod
    def _norm_hook(acc: _Acc):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs)
            if x is not None:
                acc.resid = acc.resid + _sumsq(x)
                acc.n_resid += x.numel()
            return None

        return hook

    @staticmethod
    def _sub_hook(acc: _Acc, key: str):
        def hook(module, args, kwargs, output):
            x, y = _first_tensor(args, kwargs), _output_tensor(output)
            if x is None or y is None:
                raise RuntimeError(f"SublayerGains: could not read the input/output tensor of {key!r}")
            acc.normed = acc.normed + _sumsq(x)
            acc.n_normed += x.numel()
            acc.out = acc.out + _sumsq(y)
            acc.n_out += y.numel()
            return None

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        for _, _, acc in self._acc.values():
            acc.reset()

    def __enter__(self) -> SublayerGains:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- results ------------------------------------------------------------------------------------
    def results(self) -> list[SublayerGain]:
        """Per sub-layer statistics (NaN where nothing was seen).  Reads the device sums (a host sync)."""
        keys = list(self._acc)
        sums = []
        for k in keys:
            _, _, a = self._acc[k]
            sums += [a.resid, a.normed, a.out]
        vals = [float(s) for s in sums]
        out = []
        for i, k in enumerate(keys):
            b, kind, a = self._acc[k]
            resid, normed, o = (float(v) for v in vals[3 * i : 3 * i + 3])

            def rms(s: float, n: int) -> float:
                return math.sqrt(s / n) if n else math.nan

            r_out, r_normed = rms(o, a.n_out), rms(normed, a.n_normed)
            r_in = rms(resid, a.n_resid) if a.has_norm else r_normed
            gain = r_out / r_in if r_in and r_in > 0 else math.nan
            gain_n = r_out / r_normed if r_normed and r_normed > 0 else math.nan
            out.append(SublayerGain(k, b.layer, kind, gain, gain_n, r_in, r_normed, r_out))
        return out

    def gains(self) -> dict[str, float]:
        """``{canonical sub-layer name: gain}``."""
        return {r.name: r.gain for r in self.results()}

    def metrics(self, prefix: str = "gain", normed: bool = False) -> dict[str, float]:
        """Flat logging dict: ``{prefix}/{attn|mlp}/{layer}`` per sub-layer and ``{prefix}/{attn|mlp}/mean``.
        ``normed=True`` logs ``gain_normed`` instead of ``gain``."""
        out: dict[str, float] = {}
        per_kind: dict[str, list[float]] = {}
        for r in self.results():
            g = r.gain_normed if normed else r.gain
            out[f"{prefix}/{r.kind}/{r.layer}"] = g
            per_kind.setdefault(r.kind, []).append(g)
        for kind, vs in per_kind.items():
            out[f"{prefix}/{kind}/mean"] = sum(vs) / len(vs)
        return out


@torch.no_grad()
def block_top_singular_values(
    model: nn.Module, k: int = 1, *, effective: bool = True, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The ``k`` largest singular values (descending, 1-D tensor of length ``min(k, min(shape))``) of every
    block matrix (:meth:`layerwise.anatomy.Anatomy.block_matrices`), keyed by canonical weight name.

    ``effective=True`` uses a multiplier-wrapped layer's effective weight ``diag(r)·W·diag(c)·s``
    (``module.effective_weight()``), the matrix the forward pass applies; ``False`` the stored ``weight``.
    Singular values are the square roots of :func:`layerwise.spectral.gram_eigvals` (batched per shape).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"block_top_singular_values: k must be a positive int, got {k!r}")
    from layerwise.spectral.eig import gram_eigvals

    names: list[str] = []
    mats: list[torch.Tensor] = []
    an = _anatomy.anatomy(model)
    for r in an.block_matrices():
        mod = an.module(r.module)
        eff = getattr(mod, "effective_weight", None)
        w = eff() if effective and callable(eff) else r.tensor
        if not isinstance(w, torch.Tensor):  # pragma: no cover - a block matrix row always holds its tensor
            raise TypeError(f"block_top_singular_values: no tensor for {r.name}")
        names.append(r.name)
        mats.append(w.detach())
    if not mats:
        return {}
    eigs = gram_eigvals(mats, dtype=dtype)
    svs = [e.flip(0)[:k].clamp(min=0).sqrt() for e in eigs]
    return dict(zip(names, svs))


def top_sv_metrics(model: nn.Module, prefix: str = "top_sv", *, effective: bool = True) -> dict[str, float]:
    """Flat logging dict of σ_max: ``{prefix}/{canonical weight name}`` and ``{prefix}/{operator}/mean``
    (anatomy operators q/k/v/o/qkv/gate/up/down/ssm_in/ssm_out; ``other`` where unknown).  One host sync."""
    svs = block_top_singular_values(model, 1, effective=effective)
    an = _anatomy.anatomy(model)
    if not svs:
        return {}
    vals = torch.stack([s[0].double().cpu() for s in svs.values()]).tolist()
    out: dict[str, float] = {}
    per_type: dict[str, list[float]] = {}
    for name, v in zip(svs, vals):
        out[f"{prefix}/{name}"] = v
        per_type.setdefault(an.by_name(name).operator or "other", []).append(v)
    for t, vs in per_type.items():
        out[f"{prefix}/{t}/mean"] = sum(vs) / len(vs)
    return out
