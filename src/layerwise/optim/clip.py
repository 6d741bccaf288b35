"""Global gradient-norm clipping that can leave parameters out.

Learnable multipliers (:mod:`layerwise.multipliers`) have gradients that are large compared with their size;
counting them in the global norm shrank every update in the multipliers paper, so the trainer clips with
``exclude=multipliers``.  The excluded parameters are neither counted nor scaled, unless ``clip_excluded``
asks for a separate clip of their own norm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from layerwise.names import canonical_name

ParamsOrNamed = torch.Tensor | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _split_named(parameters: ParamsOrNamed) -> tuple[list[torch.Tensor], list[str | None]]:
    if isinstance(parameters, torch.Tensor):
        return [parameters], [None]
    params: list[torch.Tensor] = []
    names: list[str | None] = []
    for i, item in enumerate(parameters):
        if isinstance(item, torch.Tensor):
            params.append(item)
            names.append(None)
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            names.append(canonical_name(str(item[0])))
            params.append(item[1])
        else:
            raise TypeError(
                f"clip_grad_norm_: parameters[{i}] is {type(item).__name__}; expected a Tensor or a (name, Tensor) pair"
            )
    return params, names


def clip_grad_norm_(
    parameters: ParamsOrNamed,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    exclude: Iterable[torch.Tensor] | Iterable[str] | Iterable[tuple[str, torch.Tensor]] | None = None,
    clip_excluded: float | None = None,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` with an exclusion list.

    Args:
        parameters: a tensor, an iterable of tensors, or an iterable of ``(name, tensor)`` pairs (e.g.
            ``model.named_parameters()``).  Parameters without ``.grad`` are ignored.
        max_norm, norm_type, error_if_nonfinite, foreach: as in ``torch.nn.utils.clip_grad_norm_``
            (positional order kept, so this is a drop-in replacement).
        exclude: parameters to leave out of the norm and of the clipping: tensors (matched by identity), or
            names (matched against canonical names, which requires named ``parameters``), or
            ``(name, tensor)`` pairs (matched by tensor identity).  ``None`` or empty: exactly torch's result.
        clip_excluded: if given, the excluded parameters are clipped *separately* to this max norm (their own
            global norm); otherwise their gradients are left untouched.

    Returns:
        The total norm of the included gradients (a 0-d tensor; no host synchronisation unless
        ``error_if_nonfinite``).

    Raises:
        ValueError: names in ``exclude`` with unnamed ``parameters``, or an excluded name that matches none.
        TypeError: an element of ``parameters`` is neither a tensor nor a ``(name, tensor)`` pair.
    """
    params, names = _split_named(parameters)
    excl_ids: set[int] = set()
    excl_names: set[str] = set()
    if exclude is not None:
        for item in [exclude] if isinstance(exclude, torch.Tensor) else exclude:
            if isinstance(item, str):
                excl_names.add(canonical_name(item))
            elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
                excl_ids.add(id(item[1]))
            elif isinstance(item, torch.Tensor):
                excl_ids.add(id(item))
            else:
                raise TypeError(
                    f"clip_grad_norm_: exclude items must be tensors, names or (name, tensor) pairs; "
                    f"got {type(item).__name__}"
                )
    if excl_names:
        if any(n is None for n in names):
            raise ValueError(
                "clip_grad_norm_: exclude contains names but parameters are unnamed; pass "
                "model.named_parameters() or exclude the tensors themselves"
            )
        missing = excl_names - set(names)
        if missing:
            raise ValueError(f"clip_grad_norm_: excluded name(s) {sorted(missing)} are not among the parameters")
    included: list[torch.Tensor] = []
    excluded: list[torch.Tensor] = []
    for p, n in zip(params, names):
        if id(p) in excl_ids or (n is not None and n in excl_names):
            excluded.append(p)
        else:
            included.append(p)

    total = _clip(included, max_norm, norm_type, error_if_nonfinite, foreach)
    if clip_excluded is not None and excluded:
        _clip(excluded, clip_excluded, norm_type, error_if_nonfinite, foreach)
    return total


def _clip(
    params: list[torch.Tensor], max_norm: float, norm_type: float, error_if_nonfinite: bool, foreach: bool | None
) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    total = get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    if grads:
        clip_grads_with_norm_(params, max_norm, total, foreach)
    return total


__all__ = ["clip_grad_norm_"]
