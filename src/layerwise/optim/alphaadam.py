"""AlphaAdam (masked AdamW with per-tensor compensation) and CautiousAdamW, its closest peer.

AlphaAdam (Chang, Li, Yuan, arXiv 2501.18094) has no public code; this is our documented
reconstruction (``docs/methods.md`` §2), with the open choices kept as options.  For every
parameter tensor, with gradient ``g`` and step ``t``:

* Adam moments, updated densely (the mask never touches optimizer state)::

      m_t = beta1 m_{t-1} + (1 - beta1) g          v_t = beta2 v_{t-1} + (1 - beta2) g^2
      u   = m_hat / (sqrt(v_hat) + eps)              (torch AdamW's convention for eps)

* mask ``M = 1[m_ref * g > 0]`` with ``m_ref = m_{t-1}`` (``mask_ref="previous"``, default: the
  paper's "historical momentum") or ``m_t`` (``"current"``, the Cautious rule); ``M = 1`` wherever
  ``m_ref == 0`` (so the first step, where ``m_0 = 0``, is an ordinary AdamW step).
* per-coordinate weight ``w = M + floor * (1 - M)`` (``floor`` gamma = 0 by default);
* per-tensor ("intra-layer") compensation, clamped to ``[1, alpha_max]``:
  ``alpha_mode="norm"`` (default) ``alpha = ||u|| / ||w * u||`` keeps the tensor's update norm;
  ``"density"`` ``alpha = 1 / mean(w)``.  At ``floor = 0`` these are ``||u|| / ||M * u||`` and
  ``1 / mean(M)``; with ``floor > 0`` we compensate only for the step actually removed, so
  ``floor = 1`` gives exactly AdamW (our choice; the paper has no floor).
* decoupled weight decay on every element, PyTorch's coupled-``lr`` convention, then the update::

      p <- p * (1 - lr * weight_decay) - lr * alpha * (w * u)     (lr * u = step_size * m / denom)

* ``masking=False`` is ``torch.optim.AdamW`` (to float32 rounding).

:class:`CautiousAdamW` (Liang et al., "Cautious Optimizers", C-Optim / timm rule) uses the same
machinery with ``M = 1[u * g > 0]`` (no exception at zero) and scale ``1 / max(mean(M), 1e-3)``.

``alpha_lag=1`` (an option; the exact rule above is the default): ``alpha`` (and, for CautiousAdamW, the
density scale) comes from the tensor's *previous* step's statistics, so a step reads and writes every
element once, like fused AdamW, instead of twice; the mask is still this step's.  The statistics are the
four sums of :func:`layerwise.optim._masked_rule.partial_sums`, kept per tensor in ``state["alpha_sums"]``
(fp32, on the parameter's device; all-reduced over shards, so equal on every rank).  A tensor without
them (its first step, or state loaded from AdamW or an ``alpha_lag=0`` run) takes the exact rule for that
step, which also yields them.  :meth:`diagnostics` then reports the ``alpha`` applied and this step's mask
density.

State and checkpoints: per-parameter state is exactly torch AdamW's (``step`` a float32 scalar tensor
on the CPU, ``exp_avg``, ``exp_avg_sq`` like the parameter: same dtype, device and layout), no extra
tensors (``alpha_lag=1`` adds ``alpha_sums``, kept fp32 by :meth:`load_state_dict`), so AdamW state
dicts load into these optimizers and back.  Moments are stored in the
parameter's dtype (like torch AdamW, and what ``Optimizer.load_state_dict`` casts to); the arithmetic is
always fp32, so bf16 parameters get fp32 math with bf16 storage.

Speed: by default (``fast=None``) fp32 CPU tensors go through a small C++ kernel
(:mod:`layerwise.optim._cpu_kernel`: built once with ``torch.utils.cpp_extension.load_inline``, cached;
one square root per element like AdamW, the masked direction kept in a scratch buffer between the two
passes; ``cpu_kernel=`` controls it) and every other tensor through compiled kernels (``torch.compile``,
``dynamic=True`` on flat 1-D aliases: one compilation serves every shape; hyper-parameters travel in
a small tensor, so learning-rate schedules never recompile).  Tensors that share device, step count,
dtypes and threading choice are batched, up to ``BUCKET_SIZE`` (8) per compiled call, since a call's
fixed cost (tens of microseconds) is that of updating a 100k-element tensor.  A masked update visits
every element twice (``alpha`` needs the whole tensor before any parameter moves): a read-only
reduction loop, then the update loop that recomputes ``u`` (see :mod:`layerwise.optim._masked_kernels`);
no extra memory.  Kernels are compiled lazily at the first step (seconds per bucket length on a CPU,
cached on disk by inductor); if compiling fails the optimizer warns once and uses the eager reference
path.  ``fast=False`` selects the eager path (the reference the tests compare against; several
temporaries per tensor and one fp32 scratch buffer per device, the size of the largest masked
parameter under the exact rule, kept between steps and not part of the state dict; ``alpha_lag=1``
needs none); ``fast=True`` makes compile errors raise.  Under an enclosing ``torch.compile`` the eager
ops are traced instead.  No step reads a device tensor on the host: the only host reads are the CPU
``step`` counters, as in torch's own non-fused AdamW.

Diagnostics: each step keeps references to the per-tensor ``alpha`` and mask density it computed
anyway (0-d tensors, no copy, no sync); :meth:`diagnostics` turns them into floats on request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _cpu_kernel as CK
from . import _masked_kernels as K
from . import _masked_rule as R

__all__ = ["AlphaAdam", "CautiousAdamW"]

_FAST_DEVICES = ("cpu", "cuda", "xpu")


def _is_dtensor(x: Any) -> bool:
    return hasattr(x, "to_local") and hasattr(x, "device_mesh")


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"[:200]


def _is_number(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.numel() == 1 and not x.is_complex()
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _MaskedAdamW(Optimizer):
    """Shared machinery: validation, state, the per-tensor dispatch (compiled / eager), diagnostics."""

    _NAME = "MaskedAdamW"

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], fast: bool | None, cpu_kernel: bool | None = None
    ) -> None:
        if fast not in (None, True, False):
            raise ValueError(f"{self._NAME}: invalid fast={fast!r}: must be None, True or False")
        if cpu_kernel not in (None, True, False):
            raise ValueError(f"{self._NAME}: invalid cpu_kernel={cpu_kernel!r}: must be None, True or False")
        if cpu_kernel is True and fast is False:
            raise ValueError(f"{self._NAME}: cpu_kernel=True needs the fast path (fast=None or True), got fast=False")
        if cpu_kernel is True and CK.load() is None:
            raise RuntimeError(f"{self._NAME}: cpu_kernel=True but the C kernel is unavailable ({CK.error()})")
        self.fast = fast
        self.cpu_kernel = cpu_kernel
        self._last_stats: list[tuple[int, int, tuple[Tensor, Tensor] | None]] = []
        self._scratch: dict[torch.device, Tensor] = {}
        super().__init__(params, defaults)

    # -- subclass hooks -------------------------------------------------------------------------
    def _rule(self, group: dict[str, Any]) -> tuple[str, str]:
        raise NotImplementedError

    def _alpha_max(self, group: dict[str, Any]) -> float:
        raise NotImplementedError

    def _floor(self, group: dict[str, Any]) -> float:
        raise NotImplementedError

    def _validate_extra(self, group: dict[str, Any], where: str) -> None:
        pass

    # -- validation -----------------------------------------------------------------------------
    def _validate(self, group: dict[str, Any], where: str) -> None:
        n = self._NAME
        lr = group["lr"]
        if not _is_number(lr) or not float(lr) >= 0.0:
            raise ValueError(f"{n}: invalid lr={lr!r}{where}: must be a number >= 0")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{n}: invalid betas={betas!r}{where}: must be a pair (beta1, beta2)")
        for i, b in enumerate(betas):
            if not _is_number(b) or not 0.0 <= float(b) < 1.0:
                raise ValueError(f"{n}: invalid betas[{i}]={b!r}{where}: must be in [0, 1)")
        eps = group["eps"]
        if not _is_number(eps) or not float(eps) >= 0.0:
            raise ValueError(f"{n}: invalid eps={eps!r}{where}: must be a number >= 0")
        wd = group["weight_decay"]
        if not _is_number(wd) or not float(wd) >= 0.0:
            raise ValueError(f"{n}: invalid weight_decay={wd!r}{where}: must be a number >= 0")
        lag = group.get("alpha_lag", 0)
        if isinstance(lag, bool) or lag not in (0, 1):
            raise ValueError(f"{n}: invalid alpha_lag={lag!r}{where}: must be 0 (exact) or 1 (previous step's alpha)")
        self._validate_extra(group, where)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        i = len(self.param_groups) - 1
        self._validate(self.param_groups[i], f" (param group {i})")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_last_stats"):
            self._last_stats = []
        if not hasattr(self, "fast"):
            self.fast = None
        if not hasattr(self, "cpu_kernel"):
            self.cpu_kernel = None
        if not hasattr(self, "_scratch"):
            self._scratch = {}
        # groups loaded from a torch AdamW checkpoint lack our keys: fall back to the constructor's
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`torch.optim.Optimizer.load_state_dict`, keeping the ``alpha_lag=1`` statistics
        (``alpha_sums``) in fp32: torch casts every per-parameter state tensor but ``step`` to the parameter's
        dtype, which for bf16 parameters would round them (and a resumed run would differ).  A malformed
        ``alpha_sums`` (not 4 floating-point numbers) raises ``ValueError`` naming its parameter, before
        anything is loaded."""
        saved_state = state_dict.get("state", {})
        kept: dict[Any, Tensor] = {}
        # groups of unequal count or size: super() raises its own error
        for gi, (saved, _) in enumerate(zip(state_dict.get("param_groups", []), self.param_groups)):
            for pi, pid in enumerate(saved.get("params", [])):
                st = saved_state.get(pid)
                if not isinstance(st, dict) or "alpha_sums" not in st:
                    continue
                sums = st["alpha_sums"]
                if not (isinstance(sums, Tensor) and sums.is_floating_point() and sums.numel() == 4):
                    raise ValueError(
                        f"{self._NAME}: invalid state['alpha_sums'] of parameter {self._param_name(gi, pi)!r}: "
                        f"must be a floating-point tensor of 4 numbers, got {_describe(sums)}"
                    )
                kept[pid] = sums
        super().load_state_dict(state_dict)
        if not kept:
            return
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in kept and p in self.state:
                sums = kept[pid]
                where = (p.to_local() if _is_dtensor(p) else p).device
                sums = sums.detach().reshape(4).to(device=where, dtype=torch.float32)
                self.state[p]["alpha_sums"] = sums.clone(memory_format=torch.contiguous_format)

    # -- step -----------------------------------------------------------------------------------
    def _param_name(self, gi: int, pi: int) -> str:
        names = self.param_groups[gi].get("param_names")
        if names is not None and pi < len(names):
            return str(names[pi])
        return f"group{gi}.param{pi}"

    def _check_sums(self, gi: int, pi: int, p: Any) -> None:
        """``state["alpha_sums"]``, if any, as every path reads and writes it (the C kernel in place): 4
        contiguous fp32 numbers on the parameter's (local) device, as :meth:`load_state_dict` stores them."""
        state = self.state.get(p)
        if not state or "alpha_sums" not in state:
            return
        sums = state["alpha_sums"]
        where = (p.to_local() if _is_dtensor(p) else p).device
        if not (
            isinstance(sums, Tensor)
            and sums.dtype == torch.float32
            and sums.shape == (4,)
            and sums.is_contiguous()
            and sums.device == where
        ):
            raise ValueError(
                f"{self._NAME}: invalid state['alpha_sums'] of parameter {self._param_name(gi, pi)!r}: must be "
                f"4 contiguous fp32 numbers on {where}, got {_describe(sums)}"
            )

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            step = state["step"]
            if not isinstance(step, Tensor):
                state["step"] = torch.tensor(float(step), dtype=torch.float32)
            elif step.device.type != "cpu" or step.dtype != torch.float32:
                # e.g. loaded from a fused / capturable AdamW: one host read, once, after loading
                state["step"] = step.detach().to("cpu", torch.float32)
        return state

    def _use_fast(self) -> bool:
        if self.fast is False:
            return False
        if torch.compiler.is_compiling():  # the caller compiles the whole step: trace the eager ops
            return False
        return True

    def _scratch_for(self, device: torch.device, numel: int) -> Tensor:
        """The fp32 scratch buffer of ``device`` (grown to ``numel`` if needed), not part of the state."""
        buf = self._scratch.get(device)
        if buf is None or buf.numel() < numel:
            self._scratch[device] = buf = torch.empty(numel, dtype=torch.float32, device=device)
        return buf

    def _fast_ok(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
        """Whether the compiled kernels can take this tensor (flat contiguous aliases of equal shape)."""
        return (
            p.device.type in _FAST_DEVICES
            and p.is_contiguous()
            and g.is_contiguous()
            and m.is_contiguous()
            and v.is_contiguous()
            and g.shape == p.shape
            and m.shape == p.shape
            and v.shape == p.shape
            and g.device == p.device
        )

    def _c_ok(self, p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
        """Whether the C kernel takes this tensor: what the compiled kernels take, on the CPU, all fp32."""
        return (
            p.device.type == "cpu"
            and p.dtype == g.dtype == m.dtype == v.dtype == torch.float32
            and self._fast_ok(p, g, m, v)
        )

    @staticmethod
    def _lag_kind(rule: str, group: dict[str, Any], state: dict[str, Any]) -> str:
        """``""`` (the exact rule), ``"first"`` (``alpha_lag=1`` without previous sums: exact, keeping its
        sums) or ``"lagged"`` (``alpha`` from the sums of the tensor's previous step)."""
        if rule == "none" or not group.get("alpha_lag", 0):
            state.pop("alpha_sums", None)  # stale once the exact rule runs: never used later
            return ""
        return "lagged" if "alpha_sums" in state else "first"

    def _run_eager(
        self, rule: str, mode: str, p: Tensor, g: Tensor, m: Tensor, v: Tensor, h: Tensor, lag: str, state: dict
    ) -> tuple[Tensor, Tensor] | None:
        pd = p.detach()
        if lag:
            alpha, density, sums = K.masked_lagged_(pd, g, m, v, h, state.get("alpha_sums"), rule, mode)
            state["alpha_sums"] = sums
            return alpha, density
        n = pd.numel()
        buf = None if rule == "none" else self._scratch_for(pd.device, n)[:n].view(pd.shape)
        return K.masked_adamw_(pd, g, m, v, h, rule, mode, buf)

    def _run_fast(
        self, rule: str, mode: str, bucket: list[tuple], h: Tensor, parallel: bool, lag: str
    ) -> list[tuple[int, tuple[Tensor, Tensor] | None]]:
        # ``view(-1).detach()`` is a flat alias that is not a view (no ``_base``): the compiled
        # kernels' guards then see plain 1-D tensors, whatever the parameters' shapes
        ps, gs, ms, vs = ([t.view(-1).detach() for t in ts] for ts in zip(*(item[1:5] for item in bucket)))
        prevs = [item[5]["alpha_sums"] for item in bucket] if lag == "lagged" else None
        outs = K.update_many_(
            ps, gs, ms, vs, h, rule, mode, parallel=parallel, strict=self.fast is True, lag=lag, prevs=prevs
        )
        if lag:
            for item, out in zip(bucket, outs):
                item[5]["alpha_sums"] = out[2]
            outs = [(out[0], out[1]) for out in outs]
        return [(item[0], out) for item, out in zip(bucket, outs)]

    def _run_c(
        self, rule: str, mode: str, batch: list[tuple], h: Tensor, lag: str, rows: Tensor | None
    ) -> list[tuple[int, tuple[Tensor, Tensor] | None]]:
        pis, ps, gs, ms, vs, states = (list(x) for x in zip(*batch))
        if rule == "none":
            CK.steps_(ps, gs, ms, vs, None, h, rule, mode, None)
            return [(pi, None) for pi in pis]
        assert rows is not None
        first = lag == "first"
        # the lagged pass needs no scratch (the buffer is passed, unused)
        scratch = self._scratch_for(ps[0].device, max(p.numel() for p in ps) if lag != "lagged" else 0)
        if lag == "first":  # the kernel writes them
            for st in states:
                st["alpha_sums"] = torch.zeros(4, dtype=torch.float32)
        sums = [st["alpha_sums"] for st in states] if lag else None
        CK.steps_(ps, gs, ms, vs, scratch, h, rule, mode, rows, sums, first)
        return [(pi, tuple(row.unbind())) for pi, row in zip(pis, rows.unbind())]  # type: ignore[misc]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step (see the module docstring for the update).  Parameters whose ``grad``
        is ``None`` are skipped (their state and ``step`` are untouched)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        fast = self._use_fast()
        cpu_f32 = False  # any fp32 CPU tensor to update (only then is the C kernel loaded: it builds once)
        # validate everything before the first tensor moves (an error never leaves a half step)
        # and size the eager path's scratch buffer once (the C path grows it as it goes: first step only)
        need: dict[torch.device, int] = {}
        exact = False  # any group with the exact masked rule (alpha_lag=0): the only one that keeps a scratch
        for gi, group in enumerate(self.param_groups):
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(f"{self._NAME}: {flag}=True (param group {gi}) is not supported")
            masked = self._rule(group)[0] != "none"
            lagged = masked and bool(group.get("alpha_lag", 0))  # the eager lagged update takes no scratch
            exact = exact or (masked and not lagged)
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"{self._NAME} does not support sparse gradients (parameter {self._param_name(gi, pi)!r})"
                    )
                if p.is_complex():
                    raise RuntimeError(
                        f"{self._NAME} does not support complex parameters (parameter {self._param_name(gi, pi)!r})"
                    )
                if lagged:
                    self._check_sums(gi, pi, p)
                elif masked and not fast:
                    need[p.device] = max(need.get(p.device, 0), p.numel())
                cpu_f32 = cpu_f32 or (p.device.type == "cpu" and p.dtype == torch.float32)
        if any(_is_dtensor(p) for group in self.param_groups for p in group["params"] if p.grad is not None):
            self._last_stats = self._step_sharded()
            return loss
        for device, numel in need.items():
            self._scratch_for(device, numel)
        use_c = fast and cpu_f32 and self.cpu_kernel is not False and CK.load() is not None
        if fast and cpu_f32 and self.cpu_kernel is None and not use_c:
            CK.warn_unavailable()  # once per process, with the reason
        stats: list[tuple[int, int, tuple[Tensor, Tensor] | None]] = []
        c_out: Tensor | None = None  # (alpha, density) rows of the C kernel's tensors, one allocation per step
        c_row = 0
        if use_c:
            c_out = torch.empty((sum(len(gr["params"]) for gr in self.param_groups), 2), dtype=torch.float32)
        for gi, group in enumerate(self.param_groups):
            rule, mode = self._rule(group)
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            eps = float(group["eps"])
            wd = float(group["weight_decay"])
            alpha_max = self._alpha_max(group)
            floor = self._floor(group)
            h_cache: dict[tuple[torch.device, float], Tensor] = {}
            # compiled path: tensors sharing (device, step, dtypes, threading, lag) go in buckets of
            # K.BUCKET_SIZE (a power of two), one compiled call per bucket (in parameter order)
            buckets: dict[tuple, list[tuple]] = {}
            # C kernel: the tensors sharing (device, step, lag) in one call
            c_batches: dict[tuple, list[tuple]] = {}
            group_stats: list[tuple[int, tuple[Tensor, Tensor] | None]] = []
            for pi, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                state = self._init_state(p)
                step_t = state["step"]
                step_t += 1.0
                t = float(step_t)  # CPU scalar: no device synchronisation
                key = (p.device, t)
                h = h_cache.get(key)
                if h is None:
                    h = h_cache[key] = R.hyper(lr, (beta1, beta2), eps, wd, t, alpha_max, floor, p.device)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                pd = p.detach()
                lag = self._lag_kind(rule, group, state)
                if use_c and self._c_ok(pd, g, m, v):
                    c_batches.setdefault((key, lag), []).append((pi, pd, g, m, v, state))
                elif fast and self._fast_ok(pd, g, m, v):
                    parallel = pd.numel() > K.PARALLEL_MIN_NUMEL
                    # one-element tensors apart: dynamo specialises sizes of 1
                    bkey = (key, pd.dtype, g.dtype, m.dtype, v.dtype, pd.numel() == 1, lag, parallel)
                    bucket = buckets.setdefault(bkey, [])
                    bucket.append((pi, pd, g, m, v, state))
                    if len(bucket) == K.BUCKET_SIZE:
                        group_stats += self._run_fast(rule, mode, bucket, h, parallel, lag)
                        del buckets[bkey]
                else:
                    group_stats.append((pi, self._run_eager(rule, mode, p, g, m, v, h, lag, state)))
            for (key, lag), batch in c_batches.items():
                rows = None
                if rule != "none":
                    rows = c_out[c_row : c_row + len(batch)]  # type: ignore[index]
                    c_row += len(batch)
                group_stats += self._run_c(rule, mode, batch, h_cache[key], lag, rows)
            for bkey, bucket in buckets.items():
                # the rest in power-of-two lengths: at most log2(BUCKET_SIZE) + 1 compiled lengths
                while bucket:
                    k = 1 << (len(bucket).bit_length() - 1)
                    group_stats += self._run_fast(rule, mode, bucket[:k], h_cache[bkey[0]], bkey[-1], bkey[-2])
                    bucket = bucket[k:]
            group_stats.sort(key=lambda item: item[0])
            stats += [(gi, pi, out) for pi, out in group_stats]
        if self._scratch and not exact:
            self._scratch.clear()  # only a C batch's first lagged step needed it: no later step does
        self._last_stats = stats
        return loss

    def _h(self, group: dict[str, Any], t: float, device: torch.device) -> Tensor:
        beta1, beta2 = (float(b) for b in group["betas"])
        return R.hyper(
            float(group["lr"]),
            (beta1, beta2),
            float(group["eps"]),
            float(group["weight_decay"]),
            t,
            self._alpha_max(group),
            self._floor(group),
            device,
        )

    def _step_sharded(self) -> list[tuple[int, int, tuple[Tensor, Tensor] | None]]:
        """The step for sharded (DTensor, e.g. FSDP2) parameters.

        Element-wise math runs on each rank's local shard (eager fp32 ops); the per-tensor statistics that
        ``alpha`` needs (``sum u^2``, ``sum (w u)^2``, mask count, element count) are partial sums stacked into
        one small tensor and summed with **one all-reduce per step** over the parameters' process group —
        never ``full_tensor()``.  Results equal the unsharded optimizer's up to reduction order.  Extra memory:
        ``w * u`` of the local shards in fp32 until the step ends.  With ``alpha_lag=1`` a tensor with
        previous sums is updated at once (``alpha`` from its ``alpha_sums``, which hold the all-reduced sums of
        its previous step, identical on every rank) and keeps no ``w * u``; the all-reduce then only carries
        this step's sums, stored for the next step.
        """
        import torch.distributed as dist

        # (gi, pi, p_local, h, direction still to apply (None: applied), rule, mode, state, lag, alpha applied)
        work: list[tuple[int, int, Tensor, Tensor, Tensor | None, str, str, dict, str, Tensor | None]] = []
        partial = []
        group_pg = None
        for gi, group in enumerate(self.param_groups):
            rule, mode = self._rule(group)
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self._init_state(p)
                state["step"] += 1.0
                t = float(state["step"])
                loc = lambda x: x.to_local() if _is_dtensor(x) else x
                pl, gl, ml, vl = loc(p.detach()), loc(p.grad), loc(state["exp_avg"]), loc(state["exp_avg_sq"])
                if _is_dtensor(p) and group_pg is None:
                    group_pg = p.device_mesh.get_group()
                h = self._h(group, t, pl.device)
                lag = self._lag_kind(rule, group, state)
                gf, mf, m_new, v_new, u = R.moments(gl, ml, vl, h)
                if rule == "none":
                    wu = u
                    partial.append(torch.zeros(4, device=pl.device))
                else:
                    maskf = R.mask(rule, gf, mf, m_new).to(torch.float32)
                    w = R.weight(maskf, h)
                    wu = w * u
                    partial.append(R.partial_sums(m_new, v_new, w, maskf, h))
                ml.copy_(m_new)
                vl.copy_(v_new)
                if lag == "lagged":  # alpha from last step's (all-reduced) sums: update now, one pass
                    alpha = R.alpha_from_sums(state["alpha_sums"], h, mode)[0]
                    R.apply_(pl, wu, h, alpha)
                    work.append((gi, pi, pl, h, None, rule, mode, state, lag, alpha))
                else:
                    work.append((gi, pi, pl, h, wu, rule, mode, state, lag, None))
        if not work:
            return []
        sums = torch.stack(partial)
        if group_pg is not None and dist.get_world_size(group_pg) > 1:
            dist.all_reduce(sums, group=group_pg)
        stats: list[tuple[int, int, tuple[Tensor, Tensor] | None]] = []
        for (gi, pi, pl, h, pending, rule, mode, state, lag, applied), part in zip(work, sums):
            if rule == "none":
                R.apply_(pl, pending, h)  # type: ignore[arg-type]
                stats.append((gi, pi, None))
                continue
            if lag:
                state["alpha_sums"] = part.clone()
            if pending is not None:  # the exact rule (alpha_lag=0, or a tensor's first lagged step)
                alpha, density = R.alpha_from_sums(part, h, mode)
                R.apply_(pl, pending, h, alpha)
                stats.append((gi, pi, (alpha, density)))
            else:
                stats.append((gi, pi, (applied, R.density_from_sums(part))))  # type: ignore[arg-type]
        return stats

    # -- diagnostics ----------------------------------------------------------------------------
    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per-parameter ``{"alpha": ..., "mask_density": ...}`` of the most recent step.

        Keys are ``group["param_names"][j]`` when the group has names, else ``"group{i}.param{j}"``.
        Only parameters updated in that step appear.  Unmasked updates (``masking=False``) report
        ``alpha = mask_density = 1``.  The values were computed by the step anyway; this call does
        one host transfer per device (call it on logging steps only).
        """
        result: dict[str, dict[str, float]] = {}
        by_device: dict[torch.device, list[tuple[str, Tensor, Tensor]]] = {}
        for gi, pi, out in self._last_stats:
            name = self._param_name(gi, pi)
            if out is None:
                result[name] = {"alpha": 1.0, "mask_density": 1.0}
            else:
                alpha, density = out
                by_device.setdefault(alpha.device, []).append((name, alpha, density))
        for items in by_device.values():
            values = torch.stack([torch.stack((a, d)) for _, a, d in items]).tolist()
            for (name, _, _), (a, d) in zip(items, values):
                result[name] = {"alpha": float(a), "mask_density": float(d)}
        return result


class AlphaAdam(_MaskedAdamW):
    """AdamW whose update is masked by gradient/momentum sign agreement, with per-tensor compensation.

    Args:
        params: parameters or parameter groups (groups may carry ``param_names``, ``group`` and other
            extra keys; any hyper-parameter below may be overridden per group).
        lr: learning rate (>= 0).
        betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: added to ``sqrt(v_hat)`` (torch AdamW convention), >= 0.
        weight_decay: decoupled decay, PyTorch's coupled convention: one step does
            ``p <- p * (1 - lr * weight_decay)`` on every element (mask or no mask).
        mask_ref: ``"previous"`` (mask from ``m_{t-1}``, default) or ``"current"`` (from ``m_t``).
        alpha_mode: ``"norm"`` (``||u|| / ||w * u||``, default) or ``"density"`` (``1 / mean(w)``).
        alpha_max: upper bound of alpha (>= 1, default 10); alpha is always >= 1.
        floor: gamma in ``[0, 1]``, the update weight kept by masked coordinates (default 0).
        masking: ``False`` gives plain AdamW (equal to ``torch.optim.AdamW``).
        alpha_lag: ``0`` (default) the exact rule: alpha from this step's statistics (two passes over
            each tensor); ``1``: alpha from the tensor's previous step (one pass; the statistics are kept in
            ``state["alpha_sums"]``, 4 fp32 numbers per tensor, saved in the state dict; a tensor's first
            step, or one whose state has no sums, uses the exact rule).  See the module docstring.
        fast: ``None`` (default: the C kernel for fp32 CPU tensors, compiled kernels for the rest, the eager
            path with one warning if compiling fails), ``True`` (the same, compile errors raise),
            ``False`` (eager reference path).
        cpu_kernel: for fp32 CPU tensors on the fast path, the C kernel of
            :mod:`layerwise.optim._cpu_kernel` (one square root per element, scratch-buffered second
            pass): ``None`` (default) where it builds, else the compiled kernel; ``True`` requires it
            (``RuntimeError`` if it cannot be built); ``False`` never.

    See the module docstring for the full update, the state layout and :meth:`diagnostics`.
    """

    _NAME = "AlphaAdam"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        mask_ref: str = "previous",
        alpha_mode: str = "norm",
        alpha_max: float = 10.0,
        floor: float = 0.0,
        masking: bool = True,
        alpha_lag: int = 0,
        fast: bool | None = None,
        cpu_kernel: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            mask_ref=mask_ref,
            alpha_mode=alpha_mode,
            alpha_max=alpha_max,
            floor=floor,
            masking=masking,
            alpha_lag=alpha_lag,
        )
        super().__init__(params, defaults, fast, cpu_kernel)

    def _validate_extra(self, group: dict[str, Any], where: str) -> None:
        n = self._NAME
        if group["mask_ref"] not in ("previous", "current"):
            raise ValueError(f"{n}: invalid mask_ref={group['mask_ref']!r}{where}: must be 'previous' or 'current'")
        if group["alpha_mode"] not in K.ALPHA_MODES:
            raise ValueError(f"{n}: invalid alpha_mode={group['alpha_mode']!r}{where}: must be 'norm' or 'density'")
        am = group["alpha_max"]
        if not _is_number(am) or not 1.0 <= float(am) < math.inf:
            raise ValueError(f"{n}: invalid alpha_max={am!r}{where}: must be a finite number >= 1")
        fl = group["floor"]
        if not _is_number(fl) or not 0.0 <= float(fl) <= 1.0:
            raise ValueError(f"{n}: invalid floor={fl!r}{where}: must be in [0, 1]")
        if not isinstance(group["masking"], bool):
            raise ValueError(f"{n}: invalid masking={group['masking']!r}{where}: must be a bool")

    def _rule(self, group: dict[str, Any]) -> tuple[str, str]:
        if not group["masking"]:
            return "none", "norm"
        return group["mask_ref"], group["alpha_mode"]

    def _alpha_max(self, group: dict[str, Any]) -> float:
        return float(group["alpha_max"])

    def _floor(self, group: dict[str, Any]) -> float:
        return float(group["floor"])


class CautiousAdamW(_MaskedAdamW):
    """Cautious AdamW (Liang et al., C-Optim; the timm rule), sharing AlphaAdam's machinery.

    ``M = 1[u * g > 0]`` with ``u`` the AdamW update direction (``sign(u) = sign(m_t)``); the update is
    ``p <- p * (1 - lr * weight_decay) - lr * (M * u) / max(mean(M), 1e-3)``.  Weight decay is PyTorch's
    coupled convention on every element; moments are updated densely; state is torch AdamW's.
    ``alpha_lag``, ``fast`` and ``cpu_kernel`` as in :class:`AlphaAdam` (``alpha_lag=1``: the scale from the
    previous step's mask density); :meth:`diagnostics` reports the scale as ``alpha``.
    """

    _NAME = "CautiousAdamW"
    MIN_DENSITY = 1e-3

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        alpha_lag: int = 0,
        fast: bool | None = None,
        cpu_kernel: bool | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha_lag=alpha_lag)
        super().__init__(params, defaults, fast, cpu_kernel)

    def _rule(self, group: dict[str, Any]) -> tuple[str, str]:
        return "cautious", "density"

    def _alpha_max(self, group: dict[str, Any]) -> float:
        return 1.0 / self.MIN_DENSITY

    def _floor(self, group: dict[str, Any]) -> float:
        return 0.0
