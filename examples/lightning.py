"""Train the reference LLaMA on the Shakespeare shards with PyTorch Lightning and layerwise.

Offline: the model is our reference LLaMA built from a config (``layerwise.lab.model``); the data comes from
``layerwise data prepare`` (``layerwise.lab.data.prepare("shakespeare")``, cached under ``$LAYERWISE_CACHE``).

    PYTHONPATH=src python examples/lightning.py --max-steps 50
    PYTHONPATH=src python examples/lightning.py --max-steps 200 --optimizer adamw --multipliers

What it shows: :class:`LayerwiseLM` (our param groups + AlphaAdam/AdamW, warm-up + cosine, multiplier-excluding
gradient clipping; one group per block matrix because the trainer has an AlphaDecay callback),
:class:`AlphaDecayCallback` (its state, ``AlphaDecay.state_dict()``, goes into Lightning checkpoints) and
:class:`WeightDecayMonitor`, logged to CSV under ``--out``.  ``--resume`` continues from ``--out/last.ckpt``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

# Run as a script, this file's folder is sys.path[0] and the file name would shadow the `lightning` package.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from layerwise.integrations.lightning import AlphaDecayCallback, LayerwiseLM, WeightDecayMonitor  # noqa: E402
from layerwise.lab.data import BatchSampler, eval_windows, prepare  # noqa: E402
from layerwise.lab.model import build_model  # noqa: E402


class RandomWindows(torch.utils.data.IterableDataset):
    """Training batches from the lab's BatchSampler: batch ``k`` depends only on (seed, k), so a resumed run
    continues with the batches an uninterrupted run would see (``start`` = optimizer steps already done)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, start: int = 0):
        self.sampler, self.start = BatchSampler(tokens, seq_len, batch_size, seed), start

    def __iter__(self):
        step = self.start
        while True:
            yield self.sampler.get(step)
            step += 1


class ValWindows(torch.utils.data.Dataset):
    def __init__(self, tokens: np.ndarray, seq_len: int, limit: int):
        self.tokens = tokens
        self.windows = [w for w in eval_windows(tokens, seq_len) if w[1] == seq_len][:limit]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int):
        s, n = self.windows[i]
        w = torch.from_numpy(self.tokens[s : s + n + 1].astype(np.int64))
        return w[:-1], w[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--out", default="runs/example_lightning")
    ap.add_argument("--optimizer", default="alphaadam", choices=["alphaadam", "cautious", "adamw", "adam"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--interval", type=int, default=25, help="AlphaDecay recomputation interval (optimizer steps)")
    ap.add_argument("--multipliers", action="store_true", help="add learnable row/column multipliers")
    ap.add_argument("--size", default="nano", help="reference model size (nano, tiny, ...)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    a = ap.parse_args()

    data = prepare("shakespeare", vocab_size=a.vocab_size, verbose=True)
    torch.manual_seed(a.seed)
    model = build_model(a.size, vocab_size=data.vocab_size, max_seq_len=a.seq_len)
    module = LayerwiseLM(
        model,
        a.optimizer,
        lr=a.lr,
        weight_decay=a.weight_decay,
        multipliers="rowcol" if a.multipliers else None,
        warmup_steps=max(1, a.max_steps // 10),
        total_steps=a.max_steps,
    )
    out = Path(a.out)
    ckpt = out / "last.ckpt"
    start = 0
    if a.resume:
        if not ckpt.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt}")
        start = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    decay_cb = AlphaDecayCallback(interval=a.interval, log_per_module=True)
    trainer = pl.Trainer(
        max_steps=a.max_steps,
        accelerator="auto",
        devices=1,
        gradient_clip_val=1.0,
        logger=CSVLogger(str(out), name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=max(1, a.max_steps // 10),
        limit_val_batches=1.0,
        val_check_interval=max(1, a.max_steps // 2),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[decay_cb, WeightDecayMonitor()],
    )
    train = torch.utils.data.DataLoader(
        RandomWindows(data.train, a.seq_len, a.batch_size, a.seed, start), batch_size=None
    )
    val = torch.utils.data.DataLoader(ValWindows(data.val, a.seq_len, limit=64), batch_size=a.batch_size)
    trainer.fit(module, train, val, ckpt_path=str(ckpt) if a.resume else None)
    trainer.save_checkpoint(ckpt)

    val_loss = float(trainer.callback_metrics["val_loss"])
    print(f"validation loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f}, 64 windows); checkpoint {ckpt}")
    print(f"\nAlphaDecay after {decay_cb.decay.step} steps ({decay_cb.decay.version} recomputations):")
    print(f"{'matrix':44s} {'alpha':>7s} {'weight_decay':>13s}")
    for row in decay_cb.decay.table():
        alpha = "nan" if row["alpha"] is None else f"{row['alpha']:.3f}"
        print(f"{row['name']:44s} {alpha:>7s} {row['weight_decay']:13.5f}")
    print(f"\nmetrics (α, λ per module, train/val loss) in {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
