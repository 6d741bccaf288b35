"""The training loop: one run from a resolved :class:`~layerwise.lab.config.Config` into a run directory.

A run directory holds ``config.toml`` (the resolved config), ``metrics.jsonl`` (one JSON object per logged
step: step, loss, lr, grad_norm, tokens_per_s, and val_loss/val_ppl at evaluations), TensorBoard events,
``checkpoints/last.pt``, ``spectral.jsonl`` (per-module alpha / decay when a controller or spectral tracking is
on) and ``summary.json`` (final_val_loss, final_val_ppl, steps, tokens, wall_s, ...).

Reproducibility: initial weights depend only on ``train.seed``; batch ``step`` depends only on
``(seed, step)``; the checkpoint carries model, optimizer, scheduler and controller state.  So a resumed run
matches an uninterrupted one (up to CPU kernels' run-to-run rounding), and every method run with seed k starts
from the same weights and sees the same batches — the basis of the paired differences in ``compare``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerwise._json import json_safe
from layerwise.lab import methods, runid
from layerwise.lab.checkpoint import CheckpointError, CheckpointStore, trim_jsonl  # noqa: F401 - re-exported
from layerwise.lab.config import Config, ConfigError, load_toml, to_toml
from layerwise.lab.data import BatchSampler, TokenData, eval_windows, prepare_config
from layerwise.lab.export import stash_tokenizer
from layerwise.lab.guard import NonFiniteGuard, NonFiniteLossError
from layerwise.lab.hf_models import build_hf_model, uses_hf, write_run_config
from layerwise.lab.model import LlamaModel, ModelConfig, model_config
from layerwise.schedules import Schedule

CKPT_NAME = "last.pt"


# ------------------------------------------------------------------------------------------ helpers
def resolve_model_config(cfg: Config, vocab_size: int) -> ModelConfig:
    m = cfg.model
    over = {
        k: getattr(m, k)
        for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
        if getattr(m, k)
    }
    if "num_heads" in over and "num_kv_heads" not in over:  # the size's kv heads were derived from its own heads
        from layerwise.lab.model import SIZES

        over["num_kv_heads"] = SIZES.get(m.size, {}).get("num_kv_heads") or over["num_heads"]
    try:
        base = model_config(m.size)
        hidden = over.get("hidden_size", base.hidden_size)
        methods.resolve_relative_widths(cfg, hidden)
        return model_config(
            m.size,
            vocab_size=vocab_size,
            max_seq_len=cfg.data.seq_len,
            init_std=m.init_std,
            parametrization=m.parametrization,
            base_hidden_size=m.base_hidden_size,
            attn_scale=m.attn_scale,
            **over,
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e


def validate(cfg: Config) -> None:
    from layerwise.lab.validation import check_values

    check_values(cfg)  # ranges, choices, finite floats, head sizes, path lengths: errors name the key
    t, o = cfg.train, cfg.optim
    checks = [
        ("train.max_steps", t.max_steps >= 1),
        ("train.batch_size", t.batch_size >= 1),
        ("train.grad_accum", t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0),
        ("train.log_every", t.log_every >= 1),
        ("train.eval_every", t.eval_every >= 0),
        ("train.stop_at", t.stop_at >= 0),
        ("train.ckpt_minutes", t.ckpt_minutes >= 0),
        ("train.device", t.device in ("cpu", "cuda")),
        ("train.dtype", t.dtype in ("auto", "fp32", "bf16")),
        ("train.parallel", t.parallel in ("none", "ddp", "fsdp")),
        ("optim.lr", o.lr > 0),
        ("optim.weight_decay", o.weight_decay >= 0),
        ("optim.warmup_frac", 0 <= o.warmup_frac < 1),
        ("optim.min_lr_ratio", 0 <= o.min_lr_ratio <= 1),
        ("optim.grad_clip", o.grad_clip >= 0),
        ("data.seq_len", cfg.data.seq_len >= 2),
    ]
    bad = [k for k, ok in checks if not ok]
    if bad:
        vals = ", ".join(f"{k}={getattr(getattr(cfg, k.split('.')[0]), k.split('.')[1])!r}" for k in bad)
        raise ConfigError(f"invalid value(s): {vals} (grad_accum must divide batch_size)")
    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device='cuda' but CUDA is not available here")
    if t.compile:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if t.compile_backend not in backends:
            raise ConfigError(
                f"train.compile_backend={t.compile_backend!r} is not a torch.compile backend "
                f"(available: {', '.join(backends)})"
            )
        modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if t.compile_mode not in modes:
            raise ConfigError(f"train.compile_mode={t.compile_mode!r} must be one of {modes}")
    schedule_of(cfg)


def make_schedule(
    max_steps: int,
    warmup_frac: float,
    min_ratio: float,
    schedule: str = "cosine",
    decay_frac: float = 0.2,
    decay_shape: str = "linear",
) -> Schedule:
    """The LR multiplier ``f(step)`` (0-based step): linear warm-up over ``warmup_frac`` of the run, then the
    :mod:`layerwise.schedules` ``schedule`` (default cosine from 1 to ``min_ratio``)."""

    return Schedule(schedule, max_steps, int(warmup_frac * max_steps), min_ratio, decay_frac, decay_shape)


def schedule_of(cfg: Config) -> Schedule:
    """The run's :class:`layerwise.schedules.Schedule` (``optim.schedule`` & co.); errors name the field."""
    o = cfg.optim
    try:
        return make_schedule(
            cfg.train.max_steps, o.warmup_frac, o.min_lr_ratio, o.schedule, o.decay_frac, o.decay_shape
        )
    except ValueError as e:
        raise ConfigError(
            f"optim.schedule={o.schedule!r} (warmup_frac={o.warmup_frac}, decay_frac="
            f"{o.decay_frac}, decay_shape={o.decay_shape!r}): {e}"
        ) from e


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise RuntimeError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens, seq_len: int, device: str, autocast, batch: int = 32, ctx=None) -> float:
    """Exact token-weighted mean cross-entropy over every target of the validation split.

    With a distributed ``ctx`` the batches are dealt round-robin to the ranks and the sums all-reduced; every
    rank runs the same number of forward passes (FSDP's collectives need that), padding with unweighted ones.
    """
    was_training = model.training
    model.eval()
    by_len: dict[int, list[int]] = {}
    for start, length in eval_windows(tokens, seq_len):
        by_len.setdefault(length, []).append(start)
    batches = [
        (length, starts[i : i + batch]) for length, starts in by_len.items() for i in range(0, len(starts), batch)
    ]
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None and ctx.active else (0, 1)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, number of targets)
    for i in range(rank, -(-len(batches) // world) * world, world):
        length, starts = batches[i] if i < len(batches) else batches[0]
        idx = torch.tensor(starts)[:, None] + torch.arange(length + 1)
        win = torch.from_numpy(tokens[idx.numpy()].astype("int64")).to(device)
        with autocast():
            logits = model(win[:, :-1])
        if i < len(batches):
            total[0] += F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), win[:, 1:].reshape(-1), reduction="sum"
            ).double()
            total[1] += win[:, 1:].numel()
    if ctx is not None:
        ctx.all_reduce_sum(total)
    model.train(was_training)
    return float(total[0] / total[1])


class MetricsLog:
    """metrics.jsonl (+ TensorBoard) writer; on resume, entries after the checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            trim_jsonl(self.path, resume_step)  # also drops a line torn by a crash mid-write
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if resume_step is None and (run_dir / "tb").is_dir():  # a fresh run: no stale events from an old one
            import shutil

            shutil.rmtree(run_dir / "tb", ignore_errors=True)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # on resume, TensorBoard hides the old files' events after the checkpoint (no duplicates)
                self.tb = SummaryWriter(
                    str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1
                )
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.tb = None

    def write(self, record: dict) -> None:
        record = json_safe(record)
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------ the run
def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    data: TokenData | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    allow_changes: bool = False,
) -> dict:
    """Train one run into ``run_dir`` and return its summary (also written to ``summary.json``).

    A fresh run refuses a ``run_dir`` that already holds a run unless ``overwrite`` (which deletes it).  With
    ``resume=True`` the run continues from its last checkpoint (``checkpoints/last.pt``, or the sharded
    ``checkpoints/last.dcp/`` of an FSDP run; without one it warns and starts from step 0).  A resume is
    checked against the run's ``identity.json`` (:mod:`layerwise.lab.runid`): changed data is refused, and
    a changed config (a longer ``train.max_steps``, a lower ``optim.lr``, ...) needs ``allow_changes`` and
    is recorded there.  Ctrl-C stops after the current step with a checkpoint
    (:class:`~layerwise.lab.progress.TrainingInterrupted`).

    Under ``train.parallel = "ddp" | "fsdp"`` (launched with torchrun) every rank calls this; rank 0 writes
    logs, metrics and the summary.  ``train.batch_size`` is the global batch.
    """
    from layerwise.lab import distributed as D
    from layerwise.lab.progress import GracefulInterrupt, TrainingInterrupted, stop_requested

    run_dir = Path(run_dir)
    runid.absolute_paths(cfg)
    validate(cfg)
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    from layerwise.lab.distwatch import translate
    from layerwise.lab.runlock import lock_run_dir

    ctx = D.setup(t.parallel, t.device, timeout_s=t.dist_timeout_s)
    ok, lock = False, None
    try:
        lock = lock_run_dir(run_dir, ctx)  # one writer per run directory (RunLockedError names the other)
        with GracefulInterrupt(enabled=not ctx.active):  # a distributed run stops on every rank or none
            if stop_requested():  # a worker that was asked to stop starts no new run
                raise TrainingInterrupted(str(run_dir), 0)
            out = _train(cfg, run_dir, resume, data, quiet, ctx, overwrite, allow_changes)
        ok = True
        return out
    except Exception as e:
        err = translate(e, ctx, t.dist_timeout_s)  # a stalled / dead peer: a clear error naming the key
        if err is not e:
            raise err from e
        raise
    finally:
        if lock is not None:
            lock.release()
        ctx.close(barrier=ok)


def _train(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    data: TokenData | None,
    quiet: bool,
    ctx,
    overwrite: bool = False,
    allow_changes: bool = False,
) -> dict:
    from layerwise.lab import distributed as D
    from layerwise.lab.progress import TrainingInterrupted, stop_requested

    t = cfg.train
    device = t.device if t.device == "cpu" or not ctx.active else f"cuda:{ctx.local_rank}"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and dev_type == "cuda")
    if t.batch_size % (ctx.world_size * t.grad_accum):
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be divisible by world size ({ctx.world_size}) "
            f"x train.grad_accum ({t.grad_accum})"
        )

    def autocast():
        if use_bf16:
            return torch.autocast(device_type=dev_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if data is None:
        if ctx.active and ctx.world_size > 1:  # rank 0 builds the cache entry; the others then load it
            if ctx.is_main:
                prepare_config(cfg.data)
            ctx.barrier()
        data = prepare_config(cfg.data)
    hf = uses_hf(cfg)
    ref_cfg = None if hf else resolve_model_config(cfg, data.vocab_size)  # the reference model's config
    ckpt_dir = run_dir / "checkpoints"
    sharded = t.parallel == "fsdp"
    ident = runid.identity(cfg, data)
    if not resume and ctx.is_main:
        runid.check_fresh(run_dir, overwrite)  # before anything in the run directory changes
    store = CheckpointStore(ckpt_dir, keep=t.keep_checkpoints, sharded=sharded, ctx=ctx)
    store.remove_orphans(resume)  # temp files of a writer that died (the run directory is locked by now)
    if resume:
        store.check_layout(t.parallel, ctx.world_size)  # before anything in the run directory changes

    torch.manual_seed(t.seed)  # same initial weights on every rank, for every method with this seed
    model: nn.Module
    if ref_cfg is None:
        model, mcfg = build_hf_model(cfg, data.vocab_size)
        if ctx.is_main:
            write_run_config(mcfg, run_dir)
        mcfg_dict = json.loads(mcfg.to_json_string())
    else:
        model, mcfg = LlamaModel(ref_cfg), ref_cfg
        mcfg_dict = ref_cfg.to_dict()
    exclude_from_clip = methods.transform_model(model, cfg)
    model.to(device)
    fwd_model = D.wrap(model, ctx, dev_type)
    optimizer = methods.build_optimizer(model, cfg, mcfg, device)
    decay = methods.build_decay(optimizer, model, cfg)
    lr_at = schedule_of(cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s))  # a closure: resume follows cfg
    start_step, tokens_seen, wall_prev, cpu_prev = 0, 0, 0.0, 0.0
    ckpt = None
    if resume:  # newest readable checkpoint; a corrupt newest one falls back to the previous with a warning
        ckpt = store.restore(
            model, optimizer, parallel=t.parallel, world_size=ctx.world_size, load_sharded=D.load_sharded
        )
        if ckpt is None:
            import warnings

            warnings.warn(
                f"--resume {run_dir}: no checkpoint in {ckpt_dir}; starting from step 0", RuntimeWarning, stacklevel=2
            )
    changes: list[str] = []
    if ckpt is None:
        if resume and ctx.is_main:
            runid.check_fresh(run_dir, True)  # a resume without checkpoint starts afresh: old files go
    else:
        ident, changes = runid.check_resume(run_dir, ident, int(ckpt["step"]), allow_changes)
    if ctx.is_main:
        runid.write(run_dir, ident)
        (run_dir / "config.toml").write_text(to_toml(cfg))
        stash_tokenizer(data, run_dir)
    if ckpt is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
        if decay is not None and ckpt.get("decay") is not None:
            decay.load_state_dict(ckpt["decay"])
        start_step, tokens_seen, wall_prev = ckpt["step"], ckpt["tokens"], ckpt["wall_s"]
        cpu_prev = ckpt.get("cpu_s", 0.0)
        lr_before = optimizer.param_groups[0]["lr"]
        ratio = cfg.optim.lr / ckpt.get("optim_lr", cfg.optim.lr)
        if ratio != 1.0:  # resumed with a different optim.lr (e.g. lower after a spike): rescale every group
            scheduler.base_lrs = [b * ratio for b in scheduler.base_lrs]
            for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
                g["initial_lr"] = base
                g["lr"] = base * lr_at(start_step)
        if changes:  # an accepted change of the schedule takes effect at once, and is reported
            for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
                g["lr"] = base * lr_at(start_step)
            if ctx.is_main:
                print(
                    f"resuming {run_dir} at step {start_step} with a changed config ({'; '.join(changes)}): "
                    f"learning rate {lr_before:.3g} -> {optimizer.param_groups[0]['lr']:.3g}; recorded in "
                    f"{run_dir / runid.IDENTITY_FILE}",
                    flush=True,
                )
    if t.compile:
        compiled = torch.compile(
            fwd_model, backend=t.compile_backend, mode=None if t.compile_mode == "default" else t.compile_mode
        )
        assert isinstance(compiled, nn.Module)  # an OptimizedModule (torch's stub types the result as a callable)
        fwd_model = compiled

    sampler = BatchSampler(data.train, cfg.data.seq_len, t.batch_size, t.seed)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    clip_excluded = {id(p) for p in exclude_from_clip}
    clip_params = [p for p in model.parameters() if p.requires_grad and id(p) not in clip_excluded]
    main = ctx.is_main
    log = MetricsLog(run_dir, start_step if ckpt is not None else None, t.tensorboard) if main else None
    spectral_log = run_dir / "spectral.jsonl"
    if main and ckpt is None and spectral_log.exists():
        spectral_log.unlink()
    elif main and ckpt is not None:
        trim_jsonl(spectral_log, start_step)  # resumed: no duplicate steps
    diag = methods.Diagnostics(model, optimizer, decay, cfg)

    def where() -> str:
        if store.last.exists():
            at = f" (step {store.last_step})" if store.last_step is not None else ""
            return f"the last good checkpoint is kept at {store.last}{at}"
        if store.restored_from is not None and store.restored_from.exists():
            return f"the checkpoint this run resumed from is kept at {store.restored_from}"
        return "no checkpoint was written"

    guard = NonFiniteGuard(device, eager=dev_type == "cpu" and ctx.world_size == 1, where=where)

    saved = {"step": start_step, "at": time.perf_counter()}

    def save(step: int, verified: bool) -> None:
        """``verified=False``: held as pending until the next step, computed from these weights, is finite."""
        guard.verify(ctx, model.parameters())  # never write a checkpoint after a non-finite step
        saved["step"], saved["at"] = step, time.perf_counter()
        extra = {
            "scheduler": scheduler.state_dict(),
            "decay": decay.state_dict() if decay is not None else None,
            "step": step,
            "tokens": tokens_seen,
            "wall_s": wall_prev + (time.perf_counter() - t0),
            "cpu_s": cpu_prev + (time.process_time() - c0),
            "model_config": mcfg_dict,
            "optim_lr": cfg.optim.lr,
            "parallel": t.parallel,
            "world_size": ctx.world_size,
        }
        if sharded:
            D.save_sharded(
                store.last,
                model,
                optimizer,
                extra,
                ctx,
                atomic_torch_save,
                commit=lambda tmp: store.commit_dcp(tmp, step, verified),
            )
        else:
            if main:  # keeps train.keep_checkpoints in all (last.pt + step-N.pt)
                store.save_pt(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra},
                    atomic_torch_save,
                    verified,
                )
            ctx.barrier()
        store.pending_step = None if verified else step  # every rank tracks it (rank 0 holds the file)

    bar = None
    if t.progress and not quiet and main:
        from tqdm import tqdm

        bar = tqdm(total=t.max_steps, initial=start_step, desc=run_dir.name, mininterval=1.0, leave=False)
    t0, c0 = time.perf_counter(), time.process_time()
    saved["at"] = t0
    t_log, tok_log = t0, tokens_seen
    # time-based checkpoints bound what a crash or kill -9 loses (one process only: ranks would disagree)
    ckpt_secs = 60.0 * t.ckpt_minutes if ctx.world_size == 1 else 0.0
    val_loss = float("nan")
    loss_sum = torch.zeros((), device=device)
    n_loss = 0
    model.train()
    if start_step == 0 and decay is not None and main:
        diag.log_decay(spectral_log, 0)
    x = None
    try:
        for step in range(start_step, t.max_steps):
            step_loss = torch.zeros((), device=device)
            for micro in range(t.grad_accum):
                x, y = sampler.get(step, micro, ctx.rank, ctx.world_size, t.grad_accum)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with D.set_grad_sync(fwd_model, ctx, micro == t.grad_accum - 1), autocast():
                    _, loss = fwd_model(x, y)
                    (loss / t.grad_accum).backward()
                step_loss += loss.detach() / t.grad_accum
            loss_sum += step_loss
            n_loss += 1
            grad_norm = _clip(clip_params, exclude_from_clip, cfg) if cfg.optim.grad_clip > 0 else None
            # before the step touches weights: a host check on CPU, a device flag (no sync) on CUDA/multi-rank
            guard.before_step(step + 1, step_loss, grad_norm, model.parameters())
            if store.pending_step is not None:  # these weights gave a finite step: the checkpoint is good
                if not guard.eager:
                    guard.verify(ctx)  # one sync per checkpoint, not per step
                store.promote()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_step
            done = step + 1
            if bar is not None:
                bar.update(1)
            if decay is not None and main:
                diag.log_decay(spectral_log, done, done % t.log_every == 0)
            is_eval = done == t.max_steps or (t.eval_every and done % t.eval_every == 0)
            if done % t.log_every == 0 or is_eval:
                now = time.perf_counter()
                guard.verify(ctx)  # the lagged check, at a point that synchronises anyway
                mean_loss = float(ctx.all_reduce_sum(loss_sum.clone())) / n_loss / ctx.world_size
                rec = {
                    "step": done,
                    "loss": mean_loss,
                    "lr": cfg.optim.lr * lr_at(step),
                    "tokens": tokens_seen,
                    "tokens_per_s": (tokens_seen - tok_log) / max(now - t_log, 1e-9),
                }
                if grad_norm is not None:
                    rec["grad_norm"] = float(
                        grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                    )
                if t.diagnostics_every and done % t.diagnostics_every == 0 and not ctx.active:
                    rec.update(diag.scalars(x, autocast))
                if t.spectral_every and done % t.spectral_every == 0 and main and not sharded:
                    diag.log_spectral(spectral_log, done)
                if is_eval:
                    val_loss = evaluate(fwd_model, data.val, cfg.data.seq_len, device, autocast, ctx=ctx)
                    rec["val_loss"], rec["val_ppl"] = val_loss, math.exp(min(val_loss, 50.0))
                if log is not None:
                    log.write(rec)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{mean_loss:.3f}",
                        tok_s=f"{rec['tokens_per_s']:.0f}",
                        **({"val": f"{val_loss:.3f}"} if is_eval else {}),
                    )
                loss_sum.zero_()
                n_loss = 0
                t_log, tok_log = time.perf_counter(), tokens_seen
            # checkpoints: at evaluations, every ckpt_every steps (whether or not a logging step) and at stop_at;
            # after the step's metrics line, so a resume never lacks a line for a step it does not redo
            due = ckpt_secs and done % t.log_every == 0 and time.perf_counter() - saved["at"] >= ckpt_secs
            if is_eval or (t.ckpt_every and done % t.ckpt_every == 0) or done == t.stop_at or due:
                ts = time.perf_counter()
                save(done, verified=done in (t.max_steps, t.stop_at))
                t_log += time.perf_counter() - ts  # the save does not count as training time
            if done == t.stop_at and done < t.max_steps:
                return {"stopped_at": done, "steps": t.max_steps, "tokens": tokens_seen}
            if stop_requested() and done < t.max_steps:  # Ctrl-C: checkpoint this step, then stop
                if saved["step"] != done:
                    save(done, verified=True)
                raise TrainingInterrupted(str(run_dir), done)
    except NonFiniteLossError:
        store.discard_pending()  # its next step was the non-finite one
        raise
    except Exception as e:  # lagged mode: NaN weights may break something else before the flag is read
        if guard.seen_nonfinite():
            store.discard_pending()
            raise NonFiniteLossError(
                f"non-finite training loss or gradient norm (then {type(e).__name__}: "
                f"{str(e)[:200]}); stopping — {where()}. Resume with a lower optim.lr."
            ) from e
        raise
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if not math.isfinite(val_loss):  # resumed at the very end: evaluate the final weights once more
        val_loss = evaluate(fwd_model, data.val, cfg.data.seq_len, device, autocast, ctx=ctx)
    wall = wall_prev + time.perf_counter() - t0
    cpu = cpu_prev + time.process_time() - c0
    summary = {
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(min(val_loss, 50.0)),
        "steps": t.max_steps,
        "tokens": tokens_seen,
        "wall_s": wall,
        "cpu_s": cpu,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": tokens_seen / wall if wall > 0 else None,
        "optimizer": cfg.optim.name,
        "decay": cfg.decay.name,
        "multipliers": cfg.multipliers.kind,
        "parametrization": cfg.model.parametrization,
        "seed": t.seed,
        "data_dir": str(data.dir),
        "parallel": t.parallel,
        "world_size": ctx.world_size,
    }
    if exclude_from_clip and t.export_merged:
        from layerwise.multipliers import merge_multipliers_state_dict

        full = D.model_state(model, ctx)
        if main:
            atomic_torch_save(
                {"model": merge_multipliers_state_dict(full), "step": t.max_steps, "model_config": mcfg_dict},
                ckpt_dir / "merged.pt",
            )
    if main:
        from layerwise.lab.stats import dump_json

        dump_json(run_dir / "summary.json", summary)
    return summary


def _clip(params, excluded, cfg: Config) -> torch.Tensor:
    if excluded:
        from layerwise.optim import clip_grad_norm_

        sep = cfg.multipliers.clip_separately or None
        return clip_grad_norm_(params + list(excluded), cfg.optim.grad_clip, exclude=excluded, clip_excluded=sep)
    return torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip, foreach=True)


def run_config(run_dir: str | Path) -> Config:
    """The resolved config of an existing run directory."""
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.toml)")
    return load_toml(path)
