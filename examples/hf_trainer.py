"""Train a tiny LlamaForCausalLM on the Shakespeare shards with the Hugging Face Trainer and layerwise.

Offline: the model is built from a LlamaConfig (no hub download); the data comes from ``layerwise data prepare``
(``layerwise.lab.data.prepare("shakespeare")``, cached under ``$LAYERWISE_CACHE``).

    PYTHONPATH=src python examples/hf_trainer.py --max-steps 50
    PYTHONPATH=src python examples/hf_trainer.py --max-steps 200 --optimizer adamw --multipliers --scale-width 128

What it shows: the optimizer factory (our param groups + AlphaAdam/AdamW, optional width scaling; one group per
block matrix, the layout the AlphaDecay callback names with ``per_matrix``), AlphaDecay as a TrainerCallback (α
and λ in the Trainer's logs; it only writes each group's weight decay, so it attaches after the Trainer has built
its LR scheduler), learnable multipliers excluded from gradient clipping, and a merged export that loads into a
plain LlamaForCausalLM.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import layerwise as lw
from layerwise.integrations.hf import (
    AlphaDecayCallback,
    MultiplierClipCallback,
    layerwise_optimizer,
    move_callback_first,
    save_merged,
)
from layerwise.lab.data import prepare


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len + 1`` tokens; labels follow HF's convention (the model shifts)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, limit: int | None = None):
        self.tokens, self.seq_len = tokens, seq_len
        n = (tokens.size - 1) // seq_len
        self.n = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        s = i * self.seq_len
        ids = torch.from_numpy(self.tokens[s : s + self.seq_len + 1].astype(np.int64))
        return {"input_ids": ids, "labels": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--out", default="runs/example_hf")
    ap.add_argument("--optimizer", default="alphaadam", choices=["alphaadam", "cautious", "adamw", "adam"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--interval", type=int, default=25, help="AlphaDecay recomputation interval (optimizer steps)")
    ap.add_argument("--multipliers", action="store_true", help="add learnable row/column multipliers")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument(
        "--scale-width",
        type=int,
        default=0,
        help="width-scaling base width (0 = off): matrix LR x base/width, matrix WD x sqrt(width/base)",
    )
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    data = prepare("shakespeare", vocab_size=a.vocab_size, verbose=True)
    torch.manual_seed(a.seed)
    cfg = LlamaConfig(
        vocab_size=data.vocab_size,
        hidden_size=a.width,
        intermediate_size=int(a.width * 8 / 3) // 8 * 8,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=a.seq_len + 1,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    if a.multipliers:
        lw.add_multipliers(model, kind="rowcol", placement="paper")
    scaling = lw.WidthScaling(base_width=a.scale_width, width=a.width) if a.scale_width else None

    out = Path(a.out)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=a.max_steps,
        per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=a.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, a.max_steps // 10),
        logging_steps=max(1, a.max_steps // 10),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        max_grad_norm=0.0 if a.multipliers else 1.0,
        seed=a.seed,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    decay_cb = AlphaDecayCallback(interval=a.interval, log_per_module=False)
    callbacks = [decay_cb] + ([MultiplierClipCallback(1.0)] if a.multipliers else [])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Windows(data.train, a.seq_len),
        eval_dataset=Windows(data.val, a.seq_len, limit=64),
        optimizer_cls_and_kwargs=layerwise_optimizer(  # the group layout the controller needs
            a.optimizer, lr=a.lr, weight_decay=a.weight_decay, scaling=scaling, per_matrix=decay_cb.per_matrix
        ),
        callbacks=callbacks,
    )
    move_callback_first(trainer, decay_cb)  # so reporting integrations see the alphadecay/* keys
    trainer.train()
    metrics = trainer.evaluate()
    print(f"validation loss {metrics['eval_loss']:.4f} (ppl {math.exp(metrics['eval_loss']):.1f}, 64 windows)")

    print(f"\nAlphaDecay after {decay_cb.decay.step} steps ({decay_cb.decay.version} recomputations):")
    print(f"{'matrix':48s} {'alpha':>7s} {'weight_decay':>13s}")
    for row in decay_cb.decay.table():
        alpha = "nan" if row["alpha"] is None else f"{row['alpha']:.3f}"
        print(f"{row['name']:48s} {alpha:>7s} {row['weight_decay']:13.5f}")

    final = out / "final"
    if a.multipliers:
        save_merged(model, final)  # multipliers folded into the weights
    else:
        model.save_pretrained(final)
    plain = LlamaForCausalLM.from_pretrained(final).to(model.device).eval()
    model.eval()
    ids = Windows(data.val, a.seq_len)[0]["input_ids"][None].to(model.device)
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    print(f"\nsaved {final} (plain LlamaForCausalLM); max |logit difference| after reload: {diff:.2e}")


if __name__ == "__main__":
    main()
