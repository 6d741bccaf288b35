"""Value checks of a resolved config, before anything runs: every value that would fail later (in the model,
the data pipeline, an optimizer, torch, the filesystem) is refused here with a :class:`ConfigError` that names
the key, the value and what is allowed.

Generic rules cover every key (so keys added later are covered too): a float must be finite.  The tables
below add ranges, choices and cross-key rules (head size, grouped-query heads, RoPE's even head size, path
length).  :func:`check_values` is called by :func:`layerwise.lab.train.validate`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

from layerwise.lab.config import Config, ConfigError

__all__ = ["check_values", "check_config_file"]

_I64 = 2**63 - 1


def _rng(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def ok(v: Any) -> bool:
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        if hi is not None and (v >= hi if hi_open else v > hi):
            return False
        return True

    def fmt(x: float) -> str:
        return (
            f"{x:g}"
            if isinstance(x, float)
            else (f"2**{x.bit_length()} - 1" if x > 10**6 and (x + 1) & x == 0 else str(x))
        )

    lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {fmt(lo)}"
    hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {fmt(hi)}"
    return ok, " and ".join(x for x in (lo_s, hi_s) if x)


def _choice(*options: str):
    return (lambda v: v in options), f"one of {list(options)}"


# key -> (predicate, description of what is allowed)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.hidden_size": _rng(0, 1 << 20),
    "model.intermediate_size": _rng(0, 1 << 22),
    "model.num_layers": _rng(0, 4096),
    "model.num_heads": _rng(0, 1 << 14),
    "model.num_kv_heads": _rng(0, 1 << 14),
    "model.init_std": _rng(0, None, lo_open=True),
    "model.parametrization": _choice("sp", "mup"),
    "model.base_hidden_size": _rng(-1024, 1 << 20),
    "model.attn_scale": _choice("sqrt", "mup"),  # base < 0: width / |base|
    "data.vocab_size": _rng(257, 65535),
    "data.seq_len": _rng(2, 1 << 20),
    "optim.lr": _rng(0, None, lo_open=True),
    "optim.weight_decay": _rng(0),
    "optim.beta1": _rng(0, 1, hi_open=True),
    "optim.beta2": _rng(0, 1, hi_open=True),
    "optim.eps": _rng(0, None, lo_open=True),
    "optim.warmup_frac": _rng(0, 1, hi_open=True),
    "optim.min_lr_ratio": _rng(0, 1),
    "optim.grad_clip": _rng(0),
    "optim.decay_frac": _rng(0, 1),
    "optim.multiplier_weight_decay": _rng(0),
    "optim.multiplier_lr_scale": _rng(0, None, lo_open=True),
    "optim.mask_ref": _choice("previous", "current"),
    "optim.alpha_mode": _choice("norm", "density"),
    "optim.alpha_max": _rng(1),
    "optim.floor": _rng(0, 1),
    "optim.alpha_lag": ((lambda v: v in (0, 1) and not isinstance(v, bool)), "0 (exact) or 1 (previous step's alpha)"),
    "optim.muon_lr": _rng(0),
    "optim.muon_momentum": _rng(0, 1, hi_open=True),
    "decay.interval": _rng(1),
    "decay.s1": _rng(0),
    "decay.s2": _rng(0),
    "decay.estimator": _choice("hill", "ks"),
    "decay.ema": _rng(0, 1, hi_open=True),
    "multipliers.kind": _choice("none", "rowcol", "row", "col", "scalar"),
    "multipliers.placement": _choice("paper", "symmetry_free"),
    "multipliers.clip_separately": _rng(0),
    "train.max_steps": _rng(1, _I64),
    "train.batch_size": _rng(1, 1 << 24),
    "train.grad_accum": _rng(1, 1 << 24),
    "train.seed": _rng(0, 2**32 - 1),
    "train.eval_every": _rng(0),
    "train.log_every": _rng(1),
    "train.ckpt_every": _rng(0),
    "train.keep_checkpoints": _rng(1, 10000),
    "train.stop_at": _rng(0),
    "train.device": _choice("cpu", "cuda"),
    "train.dtype": _choice("auto", "fp32", "bf16"),
    "train.parallel": _choice("none", "ddp", "fsdp"),
    "train.dist_timeout_s": _rng(0, 7 * 86400, lo_open=True),
    "train.num_threads": _rng(0, 4096),
    "train.spectral_every": _rng(0),
    "train.diagnostics_every": _rng(0),
}


def _items(cfg: Config):
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        for f in dataclasses.fields(section):
            yield f"{sec.name}.{f.name}", getattr(section, f.name)


def _path_problem(value: str) -> str | None:
    if "\x00" in value:
        return "contains a NUL character"
    try:
        path_max = os.pathconf("/", "PC_PATH_MAX")
        name_max = os.pathconf("/", "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # pragma: no cover - non-POSIX
        path_max, name_max = 4096, 255
    raw = os.fsencode(value) if value else b""
    if len(raw) >= path_max:
        return f"is {len(raw)} bytes long; paths are limited to {path_max - 1}"
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > name_max:
        return f"has a {longest}-byte path component; names are limited to {name_max}"
    return None


def check_values(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming every invalid key of ``cfg`` (see the module docstring)."""
    bad: list[str] = []
    for key, v in _items(cfg):
        if isinstance(v, float) and not math.isfinite(v):
            bad.append(f"{key}={v!r} (must be a finite number)")
            continue
        rule = RULES.get(key)
        if rule is not None and not isinstance(v, bool) and not rule[0](v):
            bad.append(f"{key}={v!r} (must be {rule[1]})")
    for key in ("data.corpus", "data.valid", "model.hf_config", "model.init_from"):
        sec, name = key.split(".")
        v = getattr(getattr(cfg, sec), name, None)
        if not isinstance(v, str) or v == "shakespeare":
            continue
        why = _path_problem(v)
        if why:
            bad.append(f"{key}={v[:60]!r}{'...' if len(v) > 60 else ''} ({why})")
    if not cfg.data.corpus:
        bad.append("data.corpus='' (must be 'shakespeare' or a path)")
    if bad:
        raise ConfigError("invalid value(s): " + "; ".join(bad))
    _check_cross(cfg)


def _check_cross(cfg: Config) -> None:
    t, m, d = cfg.train, cfg.model, cfg.decay
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum={t.grad_accum} must divide train.batch_size={t.batch_size}")
    if d.name == "alphadecay" and d.s1 > d.s2:
        raise ConfigError(f"decay.s1={d.s1} must be <= decay.s2={d.s2} (the decay at the smallest alpha is s1)")
    from layerwise.lab.model import SIZES

    if getattr(m, "hf_config", "") or getattr(m, "init_from", ""):
        return  # a Hugging Face model: the size fields are unused (its own config is checked when built)
    if m.size not in SIZES:
        raise ConfigError(f"model.size={m.size!r}: unknown size; choose one of {sorted(SIZES)}")
    base = SIZES[m.size]
    hidden = m.hidden_size or base.get("hidden_size", 0)
    heads = m.num_heads or base.get("num_heads", 0)
    kv = m.num_kv_heads or base.get("num_kv_heads", 0) or heads
    if heads and hidden % heads:
        raise ConfigError(f"model.hidden_size={hidden} must be divisible by model.num_heads={heads}")
    if heads and (hidden // heads) % 2:
        raise ConfigError(
            f"model.hidden_size / model.num_heads = {hidden}/{heads} = {hidden // heads}: the head "
            "size must be even (rotary embeddings rotate pairs of dimensions)"
        )
    if kv and heads % kv:
        raise ConfigError(f"model.num_heads={heads} must be a multiple of model.num_kv_heads={kv}")
    if kv > heads:
        raise ConfigError(f"model.num_kv_heads={kv} must be <= model.num_heads={heads}")


def check_config_file(path) -> None:
    """A ``--config`` path that is not a readable UTF-8 file: a :class:`ConfigError` naming it."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; --config takes a TOML file")
    if p.exists() and not p.is_file():
        raise ConfigError(f"config file {p} is not a regular file")
    if p.is_file():
        try:
            p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {p} is not UTF-8 text (byte {e.start}: {e.reason}); TOML files are UTF-8"
            ) from None
        except OSError as e:
            raise ConfigError(f"config file {p} cannot be read: {e.strerror}") from None
