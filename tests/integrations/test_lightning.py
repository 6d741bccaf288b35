"""Lightning integration: AlphaDecay callback (schedule, logging, checkpoint resume), WeightDecayMonitor,
LayerwiseLM (groups, schedule, multiplier-excluding clipping).  Tiny reference LLaMA, a few CPU steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers.logger import Logger  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

import layerwise as lw  # noqa: E402
from layerwise.integrations.lightning import AlphaDecayCallback, LayerwiseLM, WeightDecayMonitor  # noqa: E402
from layerwise.lab.model import build_model  # noqa: E402

VOCAB, SEQ, BATCH = 64, 16, 4
WD0 = 0.1


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))


def loader():
    """One batch per epoch, no shuffling: an epoch is a step, so a resumed run sees the uninterrupted batches."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    ds = torch.utils.data.TensorDataset(w[:, :-1], w[:, 1:])
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)


def module(seed=0, **kw):
    torch.manual_seed(seed)
    model = build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ + 1)
    kw.setdefault("fast", False)
    return LayerwiseLM(model, kw.pop("optimizer", "alphaadam"), lr=2e-2, weight_decay=WD0, **kw)


def trainer(max_steps, callbacks, logger=False, **kw):
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=logger,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=callbacks,
        **kw,
    )


class Recorder(pl.Callback):
    """Weight decays of the analysed matrices, read from the optimizer's groups, at train start and after steps."""

    def __init__(self):
        self.hist = {}

    def _record(self, trainer, pl_module):
        wd = {n: g["weight_decay"] for g in trainer.optimizers[0].param_groups for n in g["param_names"]}
        self.hist[trainer.global_step] = [float(wd[r.name]) for r in lw.anatomy(pl_module).block_matrices()]

    def on_train_start(self, trainer, pl_module):
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._record(trainer, pl_module)


def test_decays_change_every_interval_and_are_logged():
    cb, rec, log = AlphaDecayCallback(interval=3), Recorder(), MemoryLogger()
    trainer(7, [cb, rec], logger=log).fit(module(), loader())
    h = rec.hist
    assert sorted(h) == list(range(8))
    for s in range(1, 8):
        if s % 3 == 0:
            assert max(abs(a - b) for a, b in zip(h[s], h[s - 1])) > 1e-6, s
        else:
            assert h[s] == h[s - 1], s
    assert cb.decay.version == 3 and cb.decay.step == 7 and cb.decay.last_update_step == 6
    # the controller's table is what the optimizer holds
    assert [r["weight_decay"] for r in cb.decay.table()] == pytest.approx(h[7], rel=1e-12)
    # logged once per recomputation (steps 0, 3, 6), values = the decays in force after that step
    logged = [(step, m) for step, m in log.records if "alphadecay/weight_decay_mean" in m]
    assert [s for s, _ in logged] == [0, 3, 6]
    for step, m in logged:  # the recorder lists matrices in the controller's order
        for j, name in enumerate(cb.decay.names):
            assert m[f"alphadecay/weight_decay/{name}"] == pytest.approx(h[step][j], rel=1e-12)
            assert math.isfinite(m[f"alphadecay/alpha/{name}"])


def test_resume_equals_uninterrupted(tmp_path):
    rec_a = Recorder()
    cb_a = AlphaDecayCallback(interval=2)
    trainer(6, [cb_a, rec_a]).fit(module(), loader())

    t_b = trainer(3, [AlphaDecayCallback(interval=2)])
    t_b.fit(module(), loader())
    ckpt = tmp_path / "step3.ckpt"
    t_b.save_checkpoint(ckpt)

    rec_c, cb_c = Recorder(), AlphaDecayCallback(interval=2)
    trainer(6, [cb_c, rec_c]).fit(module(seed=1), loader(), ckpt_path=str(ckpt))
    # restored, not recomputed: at step 3 the decays are those set at step 2
    assert rec_c.hist[3] == rec_a.hist[3]
    assert cb_c.decay.step == 6 and cb_c.decay.version == 4 and cb_c.decay.last_update_step == 6
    for s in (4, 5, 6):
        np.testing.assert_allclose(rec_c.hist[s], rec_a.hist[s], rtol=1e-4)


def test_callback_state_dict_roundtrip_and_errors():
    cb = AlphaDecayCallback(interval=2)
    assert cb.state_dict() == {}
    cb.load_state_dict({})  # an empty state (saved before fit) is accepted
    with pytest.raises(ValueError, match=r"not an AlphaDecay\.state_dict\(\); got keys \['step'\]"):
        cb.load_state_dict({"step": 3})
    with pytest.raises(ValueError, match="cannot be resumed"):  # the payload callbacks wrote before
        cb.load_state_dict({"controller": {"step": 3}, "wd0": [0.1]})
    with pytest.raises(ValueError, match="interval"):
        AlphaDecayCallback(interval=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['intervall'\]"):
        AlphaDecayCallback(intervall=3)
    assert AlphaDecayCallback(modules="authors").per_matrix == "authors"

    class Plain(LayerwiseLM):
        def configure_optimizers(self):  # merged groups (and a scheduler)
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)}

    torch.manual_seed(0)
    plain = Plain(build_model("nano", vocab_size=VOCAB, max_seq_len=SEQ + 1))
    with pytest.raises(lw.GroupLayoutError, match=r"build_optimizer\(module, \.\.\., per_matrix=True\)"):
        trainer(1, [AlphaDecayCallback()]).fit(plain, loader())


def test_layerwise_lm_builds_the_layout_its_trainers_callback_needs():
    blocks = {r.name for r in lw.anatomy(module()).block_matrices()}
    for callbacks, want in (([], False), ([AlphaDecayCallback()], True), ([AlphaDecayCallback(select=r"mlp")], "mlp")):
        m, t = module(), trainer(1, callbacks)
        t.fit(m, loader())
        groups = t.optimizers[0].param_groups
        alone = {g["param_names"][0] for g in groups if len(g["params"]) == 1 and g["param_names"][0] in blocks}
        if want is False:
            assert not alone and m.group_layout() is False
        else:
            assert alone == {n for n in blocks if want is True or want in n} and m.group_layout() == want


def test_weight_decay_monitor_names_and_values():
    mon, log = WeightDecayMonitor(log_shrink=True), MemoryLogger()
    cb = AlphaDecayCallback(interval=2)
    trainer(3, [cb, mon], logger=log).fit(module(multipliers="rowcol"), loader())
    steps = [s for s, m in log.records if "wd/vector" in m]
    assert steps == [0, 1, 2]
    last = [m for s, m in log.records if "wd/vector" in m][-1]
    assert last["wd/vector"] == 0.0
    assert last["wd/multiplier"] == pytest.approx(2e-3)
    # single-matrix groups are named by their canonical name and carry the AlphaDecay value in force at step 2
    for row in cb.decay.table():
        assert last[f"wd/{row['name']}"] == pytest.approx(row["weight_decay"], rel=1e-12)
        assert last[f"wd-shrink/{row['name']}"] == pytest.approx(2e-2 * row["weight_decay"], rel=1e-12)
    with pytest.raises(MisconfigurationException, match="no logger"):
        trainer(1, [WeightDecayMonitor()]).fit(module(), loader())
    with pytest.raises(MisconfigurationException):
        WeightDecayMonitor(logging_interval="batch")


def test_layerwise_lm_groups_schedule_and_clipping():
    m = module(multipliers="rowcol", warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    assert m.lr_factor(0) == pytest.approx(0.5) and m.lr_factor(1) == pytest.approx(1.0)
    assert m.lr_factor(2) == pytest.approx(1.0) and m.lr_factor(10) == pytest.approx(0.1)
    assert m.lr_factor(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    conf = m.configure_optimizers()
    opt = conf["optimizer"]
    assert isinstance(opt, lw.AlphaAdam)
    ref = {
        n: (g["lr"], g["weight_decay"], g["group"])
        for g in lw.param_groups(m, lr=2e-2, weight_decay=WD0)
        for n in g["param_names"]
    }
    got = {n: (g["initial_lr"], g["weight_decay"], g["group"]) for g in opt.param_groups for n in g["param_names"]}
    assert got == ref
    assert all(g["lr"] == pytest.approx(0.5 * g["initial_lr"]) for g in opt.param_groups)  # warm-up step 0
    # clipping: multipliers are left out of the norm and untouched
    x, y = next(iter(loader()))
    m._loss((x, y)).backward()
    mult_before = [p.grad.clone() for p in m.multiplier_params]
    others = [p for n, p in m.named_parameters() if not n.endswith("_multiplier")]
    norm_before = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in others]))
    m.configure_gradient_clipping(opt, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
    norm_after = torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in others]))
    assert norm_before > 1e-2 and float(norm_after) == pytest.approx(1e-3, rel=1e-5)
    for a, p in zip(mult_before, m.multiplier_params):
        assert torch.equal(a, p.grad)
    # dict batches in Hugging Face's convention give the same loss as the shifted pair
    full = torch.cat([x, y[:, -1:]], dim=1)
    torch.testing.assert_close(m._loss({"input_ids": full}), m._loss((x, y)))
    with pytest.raises(ValueError, match="optimizer"):
        LayerwiseLM(torch.nn.Linear(2, 2), optimizer="sgdx")
