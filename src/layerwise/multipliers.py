"""Learnable multipliers on matrix layers (Velikanov et al., arXiv 2601.04890).

Weight decay pins the norm of every matrix at an equilibrium set by the learning rate and the decay, not by
the data.  Learnable multipliers free that scale: a matrix ``W`` is used as

    W̃ = diag(r) · W · diag(c) · s

with a *row* multiplier ``r`` (one entry per row of the stored weight), a *column* multiplier ``c`` (one per
column) and/or a *scalar* multiplier ``s``.  All start at 1, so wrapping does not change the model's function.

Conventions
-----------
* **Rows are outputs, columns are inputs** (for ``nn.Linear`` and ``nn.Embedding`` that is the stored
  weight's rows and columns; for HF ``Conv1D`` the transpose).  For ``nn.Linear`` (weight ``(out_features,
  in_features)``) ``row_multiplier`` has ``out_features`` entries (it scales outputs) and ``col_multiplier``
  has ``in_features`` entries (it scales inputs).  For ``nn.Embedding`` (weight ``(num_embeddings,
  embedding_dim)``) ``row_multiplier`` has one entry per *vocabulary* entry (a learnable per-token scale) and
  ``col_multiplier`` one per *hidden* dimension (a learnable scale of each residual-stream channel).  The same
  formula ``W̃ = r[:, None] * W * c[None, :] * s`` therefore merges every wrapped weight, which is what lets
  :func:`merge_multipliers_state_dict` work on a bare state dict.
* **Names are preserved.**  The wrapped module keeps ``<module>.weight`` (the *same* ``Parameter`` object, so
  optimizers and name-based rules keep working) and ``<module>.bias``; the multipliers are
  ``<module>.row_multiplier`` / ``<module>.col_multiplier`` / ``<module>.scalar_multiplier``
  (:data:`layerwise.names.MULTIPLIER_SUFFIXES`).  ``scalar_multiplier`` has shape ``(1,)`` (not ``()``, so
  it can be sharded like any other 1-D parameter).  Multipliers have the weight's device and dtype.
* Wrappers subclass ``nn.Linear`` / ``nn.Embedding`` (so ``isinstance`` checks keep working) and the linear
  wrapper carries ``_layerwise_linear = True``.  A bias is *not* multiplied: ``y = W̃ x + b``.
* Gradients (``G = ∂L/∂W̃``): ``∂L/∂W = s · r cᵀ ⊙ G``, ``∂L/∂r_i = s Σ_j W_ij c_j G_ij``,
  ``∂L/∂c_j = s Σ_i r_i W_ij G_ij``, ``∂L/∂s = Σ_ij r_i W_ij c_j G_ij``.
* Multipliers are meant to get a small weight decay (2e-3 in the paper, PyTorch's coupled convention
  ``θ ← θ·(1 − lr·λ)``) and to be left out of the global gradient-norm clip
  (:func:`layerwise.optim.clip.clip_grad_norm_` with ``exclude=``); under Muon they go to the AdamW side.

Forward implementations (``impl=``), all exact, chosen per module:

* ``"materialize"`` (default for Linear, the reference): ``F.linear(x, r[:, None] * W * c)`` - weight-sized
  extra work, which is much smaller than activation-sized work whenever tokens per batch exceed the layer
  width (always, in LM training);
* ``"io"`` (default for Embedding): scale the input by ``c`` and the output by ``r`` - activation-sized work;
  for an embedding the row factor is gathered per token (``r[idx]``) instead of scaling the whole table;
  See ``benchmarks/multipliers_overhead.py`` and ``benchmarks/results/multipliers.md`` for timings.

Placements (``placement=``), over the roles and operators of :func:`layerwise.anatomy`:

* ``"paper"``: every block matrix (``nn.Linear`` or Hugging Face ``Conv1D``; q/k/v/o, fused qkv, gate/up/down,
  Mamba2 / Falcon-H1 ``in_proj`` / ``out_proj``, a hand-written model's hidden layers) and the token
  embedding; never the readout.  A block matrix held by anything else (a raw parameter, ``nn.MultiheadAttention``)
  is an error naming it.
* ``"symmetry_free"``: only multipliers that do not create a continuous symmetry among themselves or with a
  decayed weight: MLP ``down`` rows+cols, ``gate`` rows; attention ``o`` rows+cols, ``q`` rows (``k`` rows
  would trade scale with ``q``, ``up`` rows with ``down`` cols, ``v`` rows with ``o`` cols); SSM ``in_proj``
  rows on its z (gate) and dt parts only (x, B, C pass the depthwise conv, which scales them; a *row subset*:
  ``row_multiplier`` has one entry per selected row, their indices in the buffer ``row_multiplier_index``),
  SSM ``out_proj`` rows, plus columns when the mixer has no gated RMSNorm; no embedding (its column scale would
  trade with the ``o``/``down`` row scales through the residual stream).  Fused qkv / gate_up matrices and
  block matrices of unknown operator get none, listed in one warning.  ``kind`` intersects with this map:
  ``"row"`` keeps the row parts, ``"col"`` the column parts, ``"scalar"`` puts one scalar on each selected
  module, ``"rowcol"`` (default) keeps the map as is.
* a callable ``placement(name, module) -> kind | True | None``: the kind for that module (``True`` = the
  ``kind`` argument, ``None``/``False`` = leave it alone).  It is called for every ``nn.Linear``, ``Conv1D``
  and ``nn.Embedding``; ``name`` is the canonical module name.

Hugging Face ``Conv1D`` (GPT-2) is wrapped by :class:`MultipliedConv1D` with the same meaning as for
``nn.Linear``: ``row_multiplier`` over outputs, ``col_multiplier`` over inputs (its weight is stored
``(in, out)``, so they act on the weight's columns and rows respectively).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layerwise import anatomy as _anatomy
from layerwise.names import MULTIPLIER_SUFFIXES, canonical_name, is_multiplier

KINDS = ("rowcol", "row", "col", "scalar")
PLACEMENTS = ("paper", "symmetry_free")
IMPLS = ("materialize", "io")

Placement = str | Callable[[str, nn.Module], str | bool | None]

#: symmetry-free placement: module type -> kind
SYMMETRY_FREE: dict[str, str] = {"down": "rowcol", "gate": "row", "o": "rowcol", "q": "row"}

_PARTS = {"rowcol": ("row", "col"), "row": ("row",), "col": ("col",), "scalar": ("scalar",)}


def _check_kind(kind: object, what: str = "kind") -> str:
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"invalid multiplier {what} {kind!r}; choose one of {list(KINDS)}")
    return kind


def _check_impl(impl: object) -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"invalid multiplier impl {impl!r}; choose one of {list(IMPLS)}")
    return impl


def _ones(n: int, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.ones(n, device=like.device, dtype=like.dtype))


class _MultiplierMixin(nn.Module):
    """Shared bits of the wrappers: which multipliers exist, the effective weight."""

    kind: str
    impl: str
    weight: torch.Tensor  # the wrapped module's Parameter (typed as torch types nn.Linear.weight)
    row_multiplier: nn.Parameter | None
    row_multiplier_index: torch.Tensor | None
    col_multiplier: nn.Parameter | None
    scalar_multiplier: nn.Parameter | None

    #: the stored weight is (in, out) (HF Conv1D): rows (outputs) are its dim 1, columns (inputs) its dim 0
    _transposed = False

    def _init_multipliers(self, kind: str, rows: torch.Tensor | None = None) -> None:
        parts = _PARTS[kind]
        w = self.weight
        n_out, n_in = (w.shape[1], w.shape[0]) if self._transposed else (w.shape[0], w.shape[1])
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long, device=w.device).reshape(-1)
            if "row" not in parts or rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= n_out:
                raise ValueError(f"row subset needs a row multiplier and indices in [0, {n_out}), got {rows.tolist()}")
            self.register_buffer("row_multiplier_index", rows)
        else:
            self.row_multiplier_index = None
        self.row_multiplier = _ones(n_out if rows is None else rows.numel(), w) if "row" in parts else None
        self.col_multiplier = _ones(n_in, w) if "col" in parts else None
        self.scalar_multiplier = _ones(1, w) if "scalar" in parts else None
        self.kind = kind

    def _out_scale(self) -> torch.Tensor | None:
        """The row multiplier over all outputs (ones outside a row subset)."""
        r = self.row_multiplier
        if r is None or self.row_multiplier_index is None:
            return r
        n_out = self.weight.shape[1] if self._transposed else self.weight.shape[0]
        return torch.ones(n_out, device=r.device, dtype=r.dtype).scatter(0, self.row_multiplier_index, r)

    def multipliers(self) -> dict[str, nn.Parameter]:
        """The present multipliers by suffix (``row_multiplier`` ...)."""
        return {n: getattr(self, n) for n in MULTIPLIER_SUFFIXES if getattr(self, n, None) is not None}

    def effective_weight(self) -> torch.Tensor:
        """W̃ = r[:, None] · W · c[None, :] · s in the stored layout (for an (in, out) Conv1D weight:
        c[:, None] · W · r[None, :] · s); differentiable."""
        w = self.weight
        r, c = self._out_scale(), self.col_multiplier
        if self._transposed:
            r, c = c, r
        if r is not None:
            w = w * r[:, None]
        if c is not None:
            w = w * c
        if self.scalar_multiplier is not None:
            w = w * self.scalar_multiplier
        return w


class MultipliedLinear(_MultiplierMixin, nn.Linear):
    """``nn.Linear`` whose weight is used as ``diag(r) W diag(c) s``; shares the original weight and bias."""

    _layerwise_linear = True

    def __init__(
        self, linear: nn.Linear, kind: str = "rowcol", impl: str = "materialize", rows: torch.Tensor | None = None
    ):
        nn.Module.__init__(self)  # do not allocate a new weight: reuse the wrapped module's
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_multipliers(_check_kind(kind), rows)
        self.impl = _check_impl(impl)
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, c, s = self._out_scale(), self.col_multiplier, self.scalar_multiplier
        if self.impl == "materialize":
            return F.linear(x, self.effective_weight(), self.bias)
        if c is not None:
            x = x * c
        y = F.linear(x, self.weight)
        if r is not None:
            y = y * r
        if s is not None:
            y = y * s
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}, impl={self.impl!r}"


class MultipliedConv1D(_MultiplierMixin, nn.Module):
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's layers: ``y = x W + b`` with ``W`` stored
    ``(in, out)``) with multipliers of the same meaning as :class:`MultipliedLinear`: ``row_multiplier`` has
    one entry per *output* (``W.shape[1]``), ``col_multiplier`` one per *input* (``W.shape[0]``).

    Shares the original weight and bias; :func:`merge_multipliers` puts the original ``Conv1D`` back.  Its
    state dict carries a ``multiplier_transposed`` flag so :func:`merge_multipliers_state_dict` merges
    ``c[:, None] · W · r[None, :]`` for it.
    """

    _transposed = True
    _layerwise_conv1d = True
    bias: torch.Tensor | None
    _orig: nn.Module  # the wrapped Conv1D (not a submodule)

    def __init__(
        self, conv: nn.Module, kind: str = "rowcol", impl: str = "materialize", rows: torch.Tensor | None = None
    ):
        nn.Module.__init__(self)
        w = getattr(conv, "weight", None)
        if not isinstance(w, nn.Parameter) or w.ndim != 2:
            raise ValueError(f"MultipliedConv1D wraps a Conv1D with a 2-D weight, got {type(conv).__name__}")
        b = conv.bias
        if b is not None and not isinstance(b, torch.Tensor):
            raise ValueError(f"MultipliedConv1D wraps a Conv1D whose bias is a tensor or None, got {type(b).__name__}")
        object.__setattr__(self, "_orig", conv)  # not a submodule: names stay <module>.weight / .bias
        self.nf = w.shape[1]
        self.weight = w
        self.bias = b
        self._init_multipliers(_check_kind(kind), rows)
        self.register_buffer("multiplier_transposed", torch.ones((), dtype=torch.bool, device=w.device))
        self.impl = _check_impl(impl)
        self.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.shape[:-1] + (self.nf,)
        x2 = x.reshape(-1, x.shape[-1])
        if self.impl == "materialize":
            w = self.effective_weight()
            y = x2 @ w if self.bias is None else torch.addmm(self.bias, x2, w)
            return y.reshape(size_out)
        r, c, s = self._out_scale(), self.col_multiplier, self.scalar_multiplier
        if c is not None:
            x2 = x2 * c
        y = x2 @ self.weight
        if r is not None:
            y = y * r
        if s is not None:
            y = y * s
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(size_out)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.weight.shape[0]}, kind={self.kind!r}, impl={self.impl!r}"


class MultipliedEmbedding(_MultiplierMixin, nn.Embedding):
    """``nn.Embedding`` whose table is used as ``diag(r) E diag(c) s`` (r over vocabulary, c over hidden)."""

    def __init__(self, emb: nn.Embedding, kind: str = "rowcol", impl: str = "io"):
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("add_multipliers does not support nn.Embedding with max_norm or sparse=True")
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = emb.padding_idx, None, emb.norm_type
        self.scale_grad_by_freq, self.sparse = emb.scale_grad_by_freq, False
        self.weight = emb.weight
        self._init_multipliers(_check_kind(kind))
        self.impl = _check_impl(impl)
        self.train(emb.training)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.impl == "materialize":
            w = self.effective_weight()
            return F.embedding(idx, w, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)
        y = F.embedding(idx, self.weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False)
        if self.col_multiplier is not None:
            y = y * self.col_multiplier
        if self.row_multiplier is not None:
            y = y * self.row_multiplier[idx].unsqueeze(-1)
        if self.scalar_multiplier is not None:
            y = y * self.scalar_multiplier
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind!r}, impl={self.impl!r}"


_WRAPPERS = (MultipliedLinear, MultipliedConv1D, MultipliedEmbedding)


def _is_conv1d(mod: nn.Module) -> bool:
    return any(c.__name__ == "Conv1D" for c in type(mod).__mro__) and hasattr(mod, "nf")


def _restrict(kind: str, spec: str) -> str | None:
    """The part of placement map entry ``spec`` (rowcol/row/col) that the requested ``kind`` keeps."""
    if kind == "scalar":
        return "scalar"
    parts = [p for p in _PARTS[spec] if p in _PARTS[kind]]
    if not parts:
        return None
    return "rowcol" if len(parts) == 2 else parts[0]


@dataclass
class _Plan:
    name: str  # module name (raw, as named_modules gives it)
    module: nn.Module
    kind: str
    rows: torch.Tensor | None = None


def _plan(model: nn.Module, placement: Placement, kind: str) -> tuple[list[_Plan], list[str]]:
    """What ``add_multipliers`` wraps: (plans, notes on block matrices the placement leaves alone on purpose)."""
    an = _anatomy.anatomy(model)
    raw_names = {canonical_name(n): n for n, _ in model.named_modules()}
    wrappable = {cn: model.get_submodule(rn) if rn else model for cn, rn in raw_names.items()}
    plans: list[_Plan] = []
    notes: list[str] = []
    if callable(placement):
        for cn, mod in wrappable.items():
            if (
                type(mod) not in (nn.Linear, nn.Embedding)
                and not _is_conv1d(mod)
                and not isinstance(mod, (nn.Linear, nn.Embedding))
            ):
                continue
            out = placement(cn, mod)
            if out is None or out is False:
                continue
            chosen = (
                kind
                if out is True
                else _check_kind(out, what=f"kind returned by the placement callable for module {cn!r}")
            )
            plans.append(_Plan(raw_names[cn], mod, chosen))
        return plans, notes

    def module_of(info) -> nn.Module:
        mod = wrappable.get(info.module)
        if (
            mod is None
            or info.name != f"{info.module}.weight"
            or not (type(mod) in (nn.Linear, nn.Embedding) or _is_conv1d(mod))
        ):
            raise ValueError(
                f"add_multipliers(placement={placement!r}): block matrix {info.name!r} belongs to "
                f"{type(mod).__name__ if mod is not None else 'no module'} {info.module!r}, which cannot be wrapped "
                "(only nn.Linear, transformers Conv1D and nn.Embedding weights); pass a placement callable that "
                "leaves it out"
            )
        return mod

    gated_norm_mixers = {r.module.rsplit(".", 1)[0] for r in an.where("norm") if r.block is not None}
    for info in an.rows:
        if info.role == "block_matrix":
            if placement == "paper":
                plans.append(_Plan(raw_names[info.module], module_of(info), kind))
                continue
            op = info.operator
            if op in SYMMETRY_FREE:
                k = _restrict(kind, SYMMETRY_FREE[op])
                if k is not None:
                    plans.append(_Plan(raw_names[info.module], module_of(info), k))
            elif op == "ssm_in":
                # rows on the z (gate) and dt parts only: x, B, C pass the depthwise conv, which scales them
                if not info.parts:
                    raise ValueError(
                        f"add_multipliers(placement='symmetry_free'): cannot read the z/x/B/C/dt split "
                        f"of {info.name!r} (shape {list(info.shape)}); pass a placement callable"
                    )
                rng = [(a, b) for part, a, b in info.parts if part in ("z", "dt")]
                rows = torch.cat([torch.arange(a, b) for a, b in rng])
                k = _restrict(kind, "row")
                if k == "row":
                    plans.append(_Plan(raw_names[info.module], module_of(info), "row", rows))
                elif k == "scalar":
                    plans.append(_Plan(raw_names[info.module], module_of(info), "scalar"))
            elif op == "ssm_out":
                mixer = info.module.rsplit(".", 1)[0]
                spec = "row" if mixer in gated_norm_mixers else "rowcol"  # a gated RMSNorm already scales columns
                k = _restrict(kind, spec)
                if k is not None:
                    plans.append(_Plan(raw_names[info.module], module_of(info), k))
            elif op in ("k", "v", "up"):
                pass  # their scale trades with q / o / down: symmetric by design
            else:
                notes.append(f"{info.name} (operator {op})")
        elif info.role == "embedding" and info.operator == "token" and placement == "paper":
            emb = wrappable.get(info.module)
            if isinstance(emb, nn.Embedding) and info.name == f"{info.module}.weight":
                plans.append(_Plan(raw_names[info.module], emb, kind))
    return plans, notes


def add_multipliers(
    model: nn.Module,
    kind: str = "rowcol",
    placement: Placement = "paper",
    *,
    impl: str | None = None,
) -> list[nn.Parameter]:
    """Add learnable multipliers (initialised to 1) to the matrices the placement names, in place.

    Which matrices: :func:`layerwise.anatomy` decides (block matrices, the token embedding, operators), so the
    same placement works on our reference LLaMA, ``transformers``' LLaMA / Qwen2 / GPT-2 (``Conv1D``) /
    GPT-NeoX / BERT / Falcon-H1 / Mamba2 and hand-written models.  See the module docstring for the placements.

    Args:
        model: any ``nn.Module``.  Apply before wrapping it with DDP / FSDP / ``torch.compile``.
        kind: ``"rowcol"`` | ``"row"`` | ``"col"`` | ``"scalar"`` (see the module docstring for row/column).
        placement: ``"paper"`` | ``"symmetry_free"`` | ``callable(name, module) -> kind | True | None``.
        impl: forward implementation for every wrapped module; default ``"materialize"`` for Linear / Conv1D
            and ``"io"`` for Embedding.  Change later with :func:`set_multiplier_impl`.

    Returns:
        The new multiplier parameters, in module order.  Names are ``<module>.row_multiplier`` etc.; the
        wrapped module keeps ``<module>.weight``.  They are not in any existing optimizer: build the
        optimizer after this call (if no optimizer holds them by its second step, an
        :class:`~layerwise._coverage.UntrainedParameterWarning` says so).

    Raises:
        ValueError: unknown ``kind``/``placement``/``impl``, the model already has multipliers, a block matrix
            the placement selects is not held by a wrappable module (``nn.Linear``, ``Conv1D``; named), or a
            module to wrap has backward hooks (named; nothing is wrapped).  Forward hooks (e.g. μP's readout
            multiplier from ``WidthScaling.apply_``) move to the wrapper, and back in :func:`merge_multipliers`.
    """
    _check_kind(kind)
    if not callable(placement) and (not isinstance(placement, str) or placement not in PLACEMENTS):
        raise ValueError(
            f"invalid multiplier placement {placement!r}; choose one of {list(PLACEMENTS)} or pass a callable "
            "(name, module) -> kind | None"
        )
    if impl is not None:
        _check_impl(impl)
    existing = [canonical_name(n) for n, m in model.named_modules() if isinstance(m, _WRAPPERS)]
    if existing:
        raise ValueError(
            f"model already has multipliers (e.g. on {existing[0]!r}, {len(existing)} modules); "
            "call merge_multipliers(model) first to fold them in"
        )
    plans, notes = _plan(model, placement, kind)
    if notes:
        _anatomy.warn_once(
            f"add_multipliers:{placement}:{','.join(notes)}",
            f"add_multipliers(placement={placement!r}) puts no multiplier on {len(notes)} block "
            f"matrix(es) whose operator it has no rule for: "
            + ", ".join(notes[:8])
            + (" ..." if len(notes) > 8 else "")
            + "; pass a placement callable to choose",
        )
    _refuse_backward_hooks("add_multipliers", ((plan.name, plan.module) for plan in plans))
    new_params: list[nn.Parameter] = []
    named: list[tuple[str, nn.Parameter]] = []
    done: set[int] = set()
    for plan in plans:
        if id(plan.module) in done:
            continue
        done.add(id(plan.module))
        mod = plan.module
        wrapper: _MultiplierMixin
        if isinstance(mod, nn.Embedding):
            wrapper = MultipliedEmbedding(mod, plan.kind, impl or "io")
        elif _is_conv1d(mod):
            wrapper = MultipliedConv1D(mod, plan.kind, impl or "materialize", rows=plan.rows)
        elif isinstance(mod, nn.Linear):
            wrapper = MultipliedLinear(mod, plan.kind, impl or "materialize", rows=plan.rows)
        else:  # _plan only plans nn.Linear, Conv1D and nn.Embedding
            raise TypeError(f"add_multipliers cannot wrap {type(mod).__name__} {plan.name!r}")
        _set_submodule(model, plan.name, wrapper)
        new_params.extend(wrapper.multipliers().values())
        named.extend((f"{canonical_name(plan.name)}.{s}", p) for s, p in wrapper.multipliers().items())
    from layerwise._coverage import watch

    watch(named)  # warns at the first optimizer steps if no optimizer holds them (built before this call)
    return new_params


#: the forward-hook tables of an ``nn.Module`` (their handles hold references to these dicts)
_FORWARD_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _refuse_backward_hooks(what: str, modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Before replacing any module: backward hooks are tied to the module's autograd use and cannot move to a
    replacement, so a module that has them is refused, naming it (nothing is replaced)."""
    for name, mod in modules:
        if mod._backward_hooks or mod._backward_pre_hooks:
            raise ValueError(
                f"{what}: module {name!r} has backward hooks, which cannot move to the module that replaces it; "
                "remove them, call it, then register them again"
            )


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``name`` is.  The replaced module's forward hooks move with it (the same hook tables,
    so their handles still remove them): the replacement computes the same function of the same input, and a
    hook such as μP's readout multiplier (``WidthScaling.apply_``) must keep acting at that position."""
    if not name:
        raise ValueError("add_multipliers/merge_multipliers cannot replace the root module itself")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    for attr in _FORWARD_HOOK_DICTS:
        setattr(new, attr, getattr(old, attr))
    setattr(parent, child, new)


def set_multiplier_impl(model: nn.Module, impl: str) -> None:
    """Switch every wrapped Linear and Embedding to forward ``impl``."""
    _check_impl(impl)
    for mod in model.modules():
        if isinstance(mod, (MultipliedLinear, MultipliedEmbedding, MultipliedConv1D)):
            mod.impl = impl


def multiplier_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(canonical name, parameter)`` of every multiplier in ``model`` (e.g. for ``clip_grad_norm_``)."""
    return [(canonical_name(n), p) for n, p in model.named_parameters() if is_multiplier(n)]


@torch.no_grad()
def merge_multipliers(model: nn.Module) -> nn.Module:
    """Fold every multiplier into its weight and turn wrappers back into plain ``nn.Linear``/``nn.Embedding``.

    In place, same module and parameter names, same device and dtype; the weight ``Parameter`` object is
    updated in place (so existing references see the merged weight) unless it is shared with another module
    (tied weights), in which case the merged module gets a new ``Parameter`` and the other user keeps the
    unmerged one.  The product is computed in at least float32.  Returns ``model``.
    """
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, _WRAPPERS)]
    _refuse_backward_hooks("merge_multipliers", wrapped)
    for name, mod in wrapped:
        w = mod.weight
        merged = (
            mod.effective_weight().detach().to(w.dtype)
            if (mod._transposed or mod.row_multiplier_index is not None)
            else _merge_tensor(w, mod.row_multiplier, mod.col_multiplier, mod.scalar_multiplier)
        )
        weight: torch.Tensor
        if counts.get(id(w), 1) > 1:
            weight = nn.Parameter(merged, requires_grad=w.requires_grad)
        else:
            w.copy_(merged)
            weight = w
        plain: nn.Module
        if isinstance(mod, MultipliedConv1D):
            plain = mod._orig
            # torch's stub types Module attributes as Tensor | Module; a registered parameter may be set to None
            plain.bias = mod.bias  # type: ignore[assignment]
        elif isinstance(mod, MultipliedLinear):
            plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            plain.bias = mod.bias
        else:
            plain = nn.Embedding(
                mod.num_embeddings,
                mod.embedding_dim,
                padding_idx=mod.padding_idx,
                scale_grad_by_freq=mod.scale_grad_by_freq,
                device="meta",
            )
        plain.weight = weight
        plain.train(mod.training)
        _set_submodule(model, name, plain)
    return model


def _merge_tensor(
    w: torch.Tensor, r: torch.Tensor | None, c: torch.Tensor | None, s: torch.Tensor | None
) -> torch.Tensor:
    dtype = torch.promote_types(w.dtype, torch.float32)
    out = w.detach().to(dtype)
    if r is not None:
        out = out * r.detach().to(dtype)[:, None]
    if c is not None:
        out = out * c.detach().to(dtype)
    if s is not None:
        out = out * s.detach().to(dtype)
    return out.to(w.dtype)


def merge_multipliers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pure version of :func:`merge_multipliers` on a state dict: returns a new dict without multiplier
    entries whose ``<module>.weight`` entries hold ``r[:, None] · W · c · s``.  Keys keep any wrapper prefix
    (``module.``, ``_orig_mod.``); the input is not modified.

    Raises:
        ValueError: a multiplier entry has no ``<module>.weight`` beside it, or its shape does not fit.
    """
    out = dict(state_dict)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    extras: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in state_dict.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in MULTIPLIER_SUFFIXES:
            groups.setdefault(prefix, {})[suffix] = val
            del out[key]
        elif suffix in ("row_multiplier_index", "multiplier_transposed"):
            extras.setdefault(prefix, {})[suffix] = val
            del out[key]
    for prefix, mults in groups.items():
        wkey = f"{prefix}.weight" if prefix else "weight"
        if wkey not in state_dict:
            raise ValueError(f"multiplier(s) {sorted(mults)} of {prefix!r} have no weight entry {wkey!r}")
        w = state_dict[wkey]
        r, c, s = (mults.get(n) for n in MULTIPLIER_SUFFIXES)
        ex = extras.get(prefix, {})
        transposed = bool(ex["multiplier_transposed"]) if "multiplier_transposed" in ex else False
        if w.ndim == 2 and transposed:
            w = w.t()  # merge in (out, in) layout, store back as (in, out)
        if r is not None and "row_multiplier_index" in ex and w.ndim == 2:
            r = torch.ones(w.shape[0], dtype=r.dtype).scatter(0, ex["row_multiplier_index"].long().cpu(), r.cpu())
        if (
            w.ndim != 2
            or (r is not None and r.shape != (w.shape[0],))
            or (c is not None and c.shape != (w.shape[1],))
            or (s is not None and s.numel() != 1)
        ):
            raise ValueError(
                f"multiplier shapes of {prefix!r} do not fit weight {tuple(w.shape)}: "
                + ", ".join(f"{k}={tuple(v.shape)}" for k, v in mults.items())
            )
        merged = _merge_tensor(w, r, c, s.reshape(()) if s is not None else None)
        out[wkey] = merged.t().contiguous() if transposed else merged
    for prefix in set(extras) - set(groups):
        raise ValueError(f"{prefix!r} has multiplier metadata {sorted(extras[prefix])} but no multiplier")
    return out


@torch.no_grad()
def multiplier_stats(model: nn.Module) -> dict[str, float]:
    """Diagnostics for logging (one host sync).

    Keys (``T`` a module type such as ``q``/``down``/``embed``, ``P`` in ``row``/``col``/``scalar``):

    * ``"T/P_mean"``, ``"T/P_rms"``: mean and root-mean-square of all ``P`` multipliers of modules of type
      ``T`` (over all layers);
    * ``"qk_ratio/layer{i}"``: RMS of the q output scale over RMS of the k output scale in block ``i`` (output
      scale = row multiplier × scalar multiplier, 1 where absent) - q and k can trade scale freely, so its
      drift away from 1 measures motion along that symmetry;
    * ``"qk_ratio/max_abs_log"``: ``max_i |log qk_ratio_i|``.

    Empty dict when the model has no multipliers.
    """
    per_type: dict[str, list[torch.Tensor]] = {}
    out_scale: dict[tuple[int, str], torch.Tensor] = {}
    an = None
    for name, mod in model.named_modules():
        if not isinstance(mod, _WRAPPERS):
            continue
        if an is None:
            an = _anatomy.anatomy(model)
        cname = canonical_name(name)
        info = an.get(f"{cname}.weight")
        mtype = ("embed" if info.role == "embedding" else info.operator or "other") if info is not None else "other"
        for suffix, p in mod.multipliers().items():
            per_type.setdefault(f"{mtype}/{suffix.split('_')[0]}", []).append(p.detach().float().reshape(-1))
        li = info.block if info is not None else None
        if li is not None and mtype in ("q", "k"):
            scale = torch.ones((), device=mod.weight.device)
            if mod.row_multiplier is not None:
                scale = mod.row_multiplier.detach().float().pow(2).mean().sqrt()
            if mod.scalar_multiplier is not None:
                scale = scale * mod.scalar_multiplier.detach().float().abs().reshape(())
            out_scale[(li, mtype)] = scale
    keys: list[str] = []
    vals: list[torch.Tensor] = []
    for key, ts in sorted(per_type.items()):
        v = torch.cat(ts)
        keys += [f"{key}_mean", f"{key}_rms"]
        vals += [v.mean(), v.pow(2).mean().sqrt()]
    layers = sorted({li for li, _ in out_scale})
    ratios = []
    for li in layers:
        one = torch.ones((), device=next(iter(out_scale.values())).device)
        q, k = out_scale.get((li, "q"), one), out_scale.get((li, "k"), one)
        ratios.append((q / k).to(one.device))
        keys.append(f"qk_ratio/layer{li}")
    vals += ratios
    if ratios:
        keys.append("qk_ratio/max_abs_log")
        vals.append(torch.stack(ratios).log().abs().max())
    if not vals:
        return {}
    dev = vals[0].device
    return dict(zip(keys, torch.stack([v.to(dev).reshape(()) for v in vals]).tolist()))


__all__ = [
    "KINDS",
    "PLACEMENTS",
    "IMPLS",
    "SYMMETRY_FREE",
    "MultipliedLinear",
    "MultipliedConv1D",
    "MultipliedEmbedding",
    "add_multipliers",
    "merge_multipliers",
    "merge_multipliers_state_dict",
    "multiplier_parameters",
    "multiplier_stats",
    "set_multiplier_impl",
]
