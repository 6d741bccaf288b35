"""Checkpoint files of a run directory: the newest plus the previous K-1, fallback, clean-up, layout checks.

Layout of ``RUN/checkpoints/``:

* one-process and DDP runs: ``last.pt`` (newest) and ``step-00000120.pt`` ... (older, newest first);
* FSDP runs: the DCP folders ``last.dcp/`` and ``step-00000120.dcp/`` (each with ``extra.pt``).

``train.keep_checkpoints = K`` keeps the newest and the K-1 before it.  Saving never leaves a moment without a
complete checkpoint: for ``.pt`` the current ``last.pt`` is first hard-linked (or, where links are not
supported, copied) to its ``step-N.pt`` name and then replaced atomically; a DCP folder is written in full to a
temporary folder and then renamed into place.  On resume the candidates are tried newest first; one that
cannot be read is renamed ``*.corrupt`` (kept for inspection) with a warning and the previous one is used.
Temporary files of a writer that died (``.last.pt.tmp<pid>``, ``.last.dcp.tmp/``) are removed when the next
writer starts — safe because a run directory has one writer at a time (:mod:`layerwise.lab.runlock`).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from layerwise.lab.safeload import UnsafeCheckpointError

__all__ = ["CheckpointError", "CheckpointStore", "trim_jsonl"]

PT_NAME, DCP_NAME = "last.pt", "last.dcp"
_STEP_RE = re.compile(r"^step-(\d+)\.(pt|dcp)$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit this run (the message says what and how to proceed)."""


def _step_name(step: int, ext: str) -> str:
    return f"step-{step:08d}.{ext}"


def _rm(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_pt(path: Path) -> dict:
    """A ``torch.save``'d checkpoint dict, read with ``weights_only=True``; raises ``ValueError`` if unusable."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means this file is unusable
        raise ValueError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(obj, dict) or "step" not in obj:
        raise ValueError("not a layerwise checkpoint (no 'step' entry)")
    return obj


class CheckpointStore:
    """The checkpoints of one run: ``save`` (rank 0 for ``.pt``; every rank for DCP), ``restore`` and clean-up.

    ``sharded`` selects the DCP layout (FSDP).  ``ctx`` is the run's :class:`~layerwise.lab.distributed.
    DistContext` (``None``: one process).
    """

    def __init__(self, ckpt_dir: str | Path, *, keep: int = 2, sharded: bool = False, ctx=None):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        self.dir = Path(ckpt_dir)
        self.keep = keep
        self.sharded = sharded
        self.ctx = ctx
        self.ext = "dcp" if sharded else "pt"
        self.last = self.dir / (DCP_NAME if sharded else PT_NAME)
        self.last_step: int | None = None  # the step held by `last` when this process wrote or loaded it
        self.own: set[int] = set()  # steps of the older checkpoints that belong to this run
        self.restored_from: Path | None = None

    @property
    def _main(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    def _barrier(self) -> None:
        if self.ctx is not None:
            self.ctx.barrier()

    # ------------------------------------------------------------------ listing
    def _older(self, ext: str) -> list[tuple[int, Path]]:
        """``step-N.<ext>`` checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m and m.group(2) == ext:
                out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    def candidates(self, ext: str | None = None) -> list[Path]:
        """Existing checkpoints of layout ``ext`` (default: this store's), newest first."""
        ext = ext or self.ext
        last = self.dir / (DCP_NAME if ext == "dcp" else PT_NAME)
        out = [last] if last.exists() else []
        if ext == "dcp" and (self.dir / f"{DCP_NAME}.old").exists():  # left by a crash mid-swap (older layout)
            out.append(self.dir / f"{DCP_NAME}.old")
        return out + [p for _, p in self._older(ext)]

    def remove_orphans(self, resume: bool = True) -> list[Path]:
        """Delete temporary files/folders a crashed writer left (call once the run directory is locked).  A
        pending checkpoint left by a crash (not by a non-finite step: those are discarded) is complete and
        all steps up to it were finite: on resume it becomes the newest checkpoint."""
        removed = []
        if self._main and self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith(".") and ".tmp" in p.name:
                    _rm(p)
                    removed.append(p)
            pend = self.pending_path
            if pend.exists():
                step = self._step_of(pend) if resume else None
                if step is None:
                    _rm(pend)
                    removed.append(pend)
                else:
                    self.last_step = self._step_of(self.last) if self.last.exists() else None
                    self.own = {s for s, _ in self._older(self.ext) if s < step}
                    (self._install_dcp if self.sharded else self._install_pt)(pend, step)
                    self.last_step, self.own = None, set()
        self._barrier()
        return removed

    def _step_of(self, path: Path) -> int | None:
        """The step a checkpoint holds (read lazily: ``mmap`` / the small ``extra.pt``), or None if unreadable."""
        try:
            if path.is_dir():
                return int(_read_pt(path / "extra.pt")["step"])
            return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
        except Exception:  # noqa: BLE001 - unreadable: not a usable checkpoint
            return None

    # ------------------------------------------------------------------ layout check
    def check_layout(self, parallel: str, world_size: int) -> None:
        """Refuse a resume whose ``train.parallel`` cannot read the checkpoints that are there."""
        other = "pt" if self.sharded else "dcp"
        if not self.candidates() and self.candidates(other):
            was = "fsdp" if other == "dcp" else "none or ddp"
            found = self.candidates(other)[0].name
            raise CheckpointError(
                f"cannot resume: this run's checkpoints were written with train.parallel={was} "
                f"({self.dir / found}), but this resume has train.parallel={parallel!r}, which reads "
                f"{'DCP folders (last.dcp/)' if self.sharded else 'last.pt'}. Resume with "
                f"--set train.parallel={'fsdp' if other == 'dcp' else 'ddp (or none)'} instead."
            )

    def _check_extra(self, ckpt: dict, path: Path, parallel: str, world_size: int) -> None:
        saved_par, saved_ws = ckpt.get("parallel"), ckpt.get("world_size")
        if self.sharded and saved_par not in (None, "fsdp"):
            raise CheckpointError(
                f"cannot resume from {path}: written with train.parallel={saved_par!r}, "
                f"this resume has train.parallel={parallel!r}"
            )
        if self.sharded and saved_ws is not None and saved_ws != world_size:
            raise CheckpointError(
                f"cannot resume from {path}: its FSDP shards were written by {saved_ws} processes, this launch "
                f"has {world_size}. Resume with the same number of processes (torchrun --nproc_per_node "
                f"{saved_ws}, or nnodes x nproc_per_node = {saved_ws})."
            )

    # ------------------------------------------------------------------ restore
    def restore(
        self,
        model,
        optimizer,
        *,
        parallel: str,
        world_size: int,
        load_sharded: Callable[[Path, Any, Any], None] | None = None,
    ) -> dict | None:
        """Load the newest readable checkpoint into ``model``/``optimizer`` and return its dict (for DCP: the
        ``extra.pt`` dict), or ``None`` when there is none.  Unreadable ones are set aside with a warning; a
        checkpoint that refuses to load safely, or none readable at all, raises :class:`CheckpointError`."""
        self.check_layout(parallel, world_size)
        cands = self.candidates()
        if not cands:
            return None
        failures: list[str] = []
        chosen: dict | None = None
        restored: Path | None = None
        for path in cands:
            try:
                if self.sharded:
                    from layerwise.lab.safeload import read_metadata

                    ckpt = _read_pt(path / "extra.pt")
                    self._check_extra(ckpt, path, parallel, world_size)
                    read_metadata(path)  # refuses a crafted .metadata before anything else touches it
                    assert load_sharded is not None
                    load_sharded(path, model, optimizer)
                else:
                    ckpt = _read_pt(path)
                    if not isinstance(ckpt.get("model"), dict) or not isinstance(ckpt.get("optimizer"), dict):
                        raise ValueError("no 'model' / 'optimizer' state")
                    self._check_extra(ckpt, path, parallel, world_size)
                    self._apply(ckpt, path, model, optimizer)
            except (CheckpointError, UnsafeCheckpointError) as e:
                raise CheckpointError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - unreadable: fall back to the previous checkpoint
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                failures.append(f"{path}: {msg}")
                continue
            chosen, restored = ckpt, path
            break
        if chosen is None or restored is None:
            raise CheckpointError(
                "no readable checkpoint to resume from:\n  "
                + "\n  ".join(failures)
                + "\nMove these aside to start the run again from step 0."
            )
        bad = cands[: cands.index(restored)]
        for path, why in zip(bad, failures):
            warnings.warn(
                f"checkpoint {why} — unreadable, resuming from the previous one "
                f"({restored.name}, step {chosen['step']}); it is kept as "
                f"{path.name}.corrupt",
                RuntimeWarning,
                stacklevel=2,
            )
        self._barrier()
        if self._main:
            for path in bad:
                os.replace(path, path.with_name(path.name + ".corrupt"))
            if restored != self.last and restored.name == f"{DCP_NAME}.old":
                os.replace(restored, self.last)
                restored = self.last
        self.restored_from = restored
        self._barrier()
        step = int(chosen["step"])
        if restored == self.last:
            self.last_step = step
            self.own = {s for s, _ in self._older(self.ext) if s < step}
        else:  # resumed from an older one: it becomes the base of the rotation
            self.last_step = None
            self.own = {s for s, _ in self._older(self.ext) if s <= step}
        return chosen

    @staticmethod
    def _apply(ckpt: dict, path: Path, model, optimizer) -> None:
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model (was model.* changed?): {str(e).splitlines()[0]} ..."
            ) from None
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {path}: optimizer state does not fit this optimizer "
                f"(was optim.* or the method changed?): {e}"
            ) from None

    # ------------------------------------------------------------------ save
    def _rotate_pt(self) -> None:
        if self.keep > 1 and self.last.exists() and self.last_step is not None:
            older = self.dir / _step_name(self.last_step, "pt")
            _rm(older)
            try:
                os.link(self.last, older)
            except OSError:  # no hard links on this filesystem: copy (atomically)
                tmp = self.dir / f".{older.name}.tmp{os.getpid()}"
                shutil.copyfile(self.last, tmp)
                os.replace(tmp, older)
            self.own.add(self.last_step)

    def _prune(self, step: int) -> None:
        """Keep the K-1 newest own older checkpoints; drop the previous run's files on a fresh run's save."""
        older = self._older(self.ext)
        mine = [(s, p) for s, p in older if s in self.own and s < step]
        for s, p in older:
            if s not in self.own or s >= step:
                _rm(p)
                self.own.discard(s)
        for s, p in mine[self.keep - 1 :]:
            _rm(p)
            self.own.discard(s)
        _fsync_dir(self.dir)

    def _install_pt(self, src: Path, step: int) -> None:
        self._rotate_pt()
        os.replace(src, self.last)
        self.last_step = step
        self._prune(step)

    def _install_dcp(self, src: Path, step: int) -> None:
        installed = False
        if self.last.exists():
            if self.keep > 1 and self.last_step is not None:
                older = self.dir / _step_name(self.last_step, "dcp")
                _rm(older)
                os.replace(self.last, older)
                self.own.add(self.last_step)
            else:  # nothing to keep: swap so that a complete folder is always there
                gone = self.dir / f".{DCP_NAME}.tmp-old"
                _rm(gone)
                os.replace(self.last, gone)
                os.replace(src, self.last)
                _rm(gone)
                installed = True
        if not installed:
            os.replace(src, self.last)
        _rm(self.dir / f"{DCP_NAME}.old")
        self.last_step = step
        self._prune(step)

    @property
    def pending_path(self) -> Path:
        return self.dir / f".pending.{self.ext}"

    def save_pt(self, obj: dict, save_fn: Callable[[Any, Path], None], verified: bool = True) -> None:
        """Rank 0: write ``obj`` (``save_fn`` writes atomically).  ``verified``: it becomes ``last.pt`` now
        (K kept in all); else it is held as pending until :meth:`promote` (after the next step proved finite
        from these weights) or :meth:`discard_pending`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        step = int(obj["step"])
        if verified:
            self.discard_pending()
            self._rotate_pt()
            save_fn(obj, self.last)
            self.last_step = step
            self._prune(step)
        else:
            save_fn(obj, self.pending_path)
        self.pending_step = None if verified else step

    def commit_dcp(self, tmp: Path, step: int, verified: bool = True) -> None:
        """Rank 0, after every rank wrote its shards into ``tmp`` and ``extra.pt`` is there: install it (or
        hold it as pending, see :meth:`save_pt`)."""
        if verified:
            self.discard_pending()
            self._install_dcp(tmp, step)
        else:
            _rm(self.pending_path)
            os.replace(tmp, self.pending_path)
        self.pending_step = None if verified else step

    pending_step: int | None = None

    def promote(self) -> None:
        """The pending checkpoint's next step was finite: make it the newest checkpoint (rank 0 renames)."""
        if self.pending_step is None:
            return
        if self._main and self.pending_path.exists():
            (self._install_dcp if self.sharded else self._install_pt)(self.pending_path, self.pending_step)
        else:
            self.last_step = self.pending_step
        self.pending_step = None

    def discard_pending(self) -> None:
        """Drop a pending checkpoint (its next step was non-finite)."""
        if self._main:
            _rm(self.pending_path)
        self.pending_step = None


def trim_jsonl(path: Path, last_step: int) -> int:
    """Drop the records of ``path`` (one JSON object per line with a ``step``) after ``last_step``, atomically;
    a torn last line (a crash mid-write) is dropped too.  Returns the number of records kept."""
    import json

    if not path.exists():
        return 0
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= last_step:
            keep.append(ln)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
    return len(keep)
