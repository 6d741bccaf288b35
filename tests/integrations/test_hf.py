"""Hugging Face Trainer integration: optimizer factory, AlphaDecay callback (schedule, logging, resume),
multiplier clipping, merged export.  Tiny LlamaForCausalLM, a handful of CPU steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import layerwise as lw  # noqa: E402
from layerwise.integrations.hf import (  # noqa: E402
    AlphaDecayCallback,
    LayerwiseOptimizerFactory,
    MultiplierClipCallback,
    build_optimizer,
    layerwise_optimizer,
    merged_state_dict,
    move_callback_first,
    save_merged,
)

VOCAB, SEQ = 64, 16
WD0 = 0.1


def tiny_llama(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def training_args(out, max_steps: int, save_steps: int = 1000, max_grad_norm: float = 1.0, **kw) -> TrainingArguments:
    return TrainingArguments(
        **kw,
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm,
    )


def opt_kwargs(name: str = "alphaadam", lr: float = 2e-2):
    extra = {"fast": False} if name in ("alphaadam", "cautious") else {}
    return layerwise_optimizer(name, lr=lr, weight_decay=WD0, **extra)


def group_decays(optimizer) -> dict[str, float]:
    """name -> weight_decay read from the optimizer's groups (what the optimizer will actually apply)."""
    out = {}
    for g in optimizer.param_groups:
        for n in g.get("param_names", []):
            out[n] = float(g["weight_decay"])
    return out


class Recorder(TrainerCallback):
    """Records the optimizer's weight decays of the analysed matrices at train begin and after every step."""

    def __init__(self, cb: AlphaDecayCallback, weights_at=()):
        self.cb, self.hist, self.weights_at, self.weights = cb, {}, set(weights_at), {}

    def _record(self, state, model, optimizer):
        wds = group_decays(optimizer)
        names = [r.name for r in lw.anatomy(model).block_matrices()]
        self.hist[state.global_step] = [wds[n] for n in names]
        if state.global_step in self.weights_at:
            params = dict(model.named_parameters())
            self.weights[state.global_step] = {n: params[n].detach().double().clone() for n in names}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self._record(state, model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self._record(state, model, optimizer)


def reference_decays(weights: dict[str, torch.Tensor], s1: float, s2: float) -> list[float]:
    """AlphaDecay's rule in float64 numpy: Hill α with xmin = λ[N//2], linear map [αmin, αmax] -> [s1, s2]·wd0."""
    alphas = []
    for w in weights.values():
        lam = np.sort(np.linalg.svd(w.numpy(), compute_uv=False) ** 2)
        i = len(lam) // 2
        tail = lam[i:]
        alphas.append(1.0 + len(tail) / np.sum(np.log(tail / lam[i])))
    a = np.array(alphas)
    return list(WD0 * (s1 + (s2 - s1) * (a - a.min()) / (a.max() - a.min())))


def run(tmp_path, max_steps, interval, *, save_steps=1000, resume=None, weights_at=(), model=None, restore=False):
    """Train; return (trainer, the trainer's AlphaDecayCallback, recorder).  With ``restore`` transformers itself
    re-creates the callback from the checkpoint (``restore_callback_states_from_checkpoint``)."""
    model = model if model is not None else tiny_llama(0)
    cb = AlphaDecayCallback(interval=interval)
    rec = Recorder(cb, weights_at)
    args = training_args(tmp_path, max_steps, save_steps, restore_callback_states_from_checkpoint=restore)
    trainer = Trainer(
        model=model, args=args, train_dataset=TokenDataset(), optimizer_cls_and_kwargs=opt_kwargs(), callbacks=[cb, rec]
    )
    trainer.train(resume_from_checkpoint=resume)
    live = [c for c in trainer.callback_handler.callbacks if isinstance(c, AlphaDecayCallback)]
    assert len(live) == 1
    return trainer, live[0], rec


# ------------------------------------------------------------------------------------------------ tests


def test_factory_builds_layerwise_groups(tmp_path):
    model = tiny_llama(0)
    lw.add_multipliers(model)
    factory, kwargs = opt_kwargs()
    assert factory is LayerwiseOptimizerFactory
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, 1),
        train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=(factory, kwargs),
    )
    trainer.create_optimizer()
    opt = trainer.optimizer
    assert isinstance(opt, lw.AlphaAdam)
    # every trainable parameter exactly once, with its canonical name
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    wd = group_decays(opt)
    blocks = [r.name for r in lw.anatomy(model).block_matrices()]
    assert len(blocks) == 14
    for g in opt.param_groups:  # analysed matrices sit alone in their groups (ready for AlphaDecay)
        if any(n in blocks for n in g["param_names"]):
            assert len(g["params"]) == 1
    for n in names:
        if "norm" in n:
            assert wd[n] == 0.0, n
        elif n.endswith("_multiplier"):
            assert wd[n] == pytest.approx(2e-3), n
        else:
            assert wd[n] == pytest.approx(WD0), n
    # the groups are the library's param_groups with one group per block matrix
    assert [g["param_names"] for g in opt.param_groups] == [
        g["param_names"] for g in lw.param_groups(model, lr=2e-2, weight_decay=WD0, per_matrix=True)
    ]
    ref = {
        n: (g["lr"], g["weight_decay"], g["group"])
        for g in lw.param_groups(model, lr=2e-2, weight_decay=WD0)
        for n in g["param_names"]
    }
    got = {n: (g["lr"], g["weight_decay"], g["group"]) for g in opt.param_groups for n in g["param_names"]}
    assert got == ref


def test_factory_width_scaling_and_bad_args():
    model = tiny_llama(0)
    rule = lw.WidthScaling(base_width=8, width=16, wd_exponent=0.5)
    opt = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1, scaling=rule)
    assert isinstance(opt, torch.optim.AdamW)
    by = {n: g for g in opt.param_groups for n in g["param_names"]}
    q = by["model.layers.0.self_attn.q_proj.weight"]
    assert q["lr"] == pytest.approx(1e-2 / 2) and q["weight_decay"] == pytest.approx(0.1 * math.sqrt(2))
    with pytest.raises(ValueError, match="optimizer name"):
        layerwise_optimizer("sgdx", lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        layerwise_optimizer("adamw", lr=-1.0)
    with pytest.raises(TypeError, match="rejected the options"):
        build_optimizer(model, "adamw", lr=1e-3, not_an_option=1)
    with pytest.raises(TypeError, match="no optimizer factories"):  # how older transformers would call it
        LayerwiseOptimizerFactory([{"params": list(model.parameters())}], lr=1e-3)


def test_decays_recomputed_every_interval_and_logged(tmp_path):
    s1, s2 = 0.6666, 3.0
    trainer, cb, rec = run(tmp_path, max_steps=7, interval=3, weights_at=(0, 6))
    h = rec.hist
    assert sorted(h) == list(range(8))
    for s in range(1, 8):
        if s % 3 == 0:
            assert max(abs(a - b) for a, b in zip(h[s], h[s - 1])) > 1e-6, f"decays should change at step {s}"
        else:
            assert h[s] == h[s - 1], f"decays changed at step {s}, interval is 3"
    assert cb.decay.version == 3 and cb.decay.step == 7 and cb.decay.last_update_step == 6
    # independent reference at a recomputation step (weights right after optimizer step 6) and at step 0
    for s in (0, 6):
        np.testing.assert_allclose(h[s], reference_decays(rec.weights[s], s1, s2), rtol=1e-4, atol=1e-7)
    # the values reach the Trainer's log history, per module and as a summary
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 7
    for e in logs:
        key = "alphadecay/weight_decay/" + cb.decay.names[0]
        assert e[key] == pytest.approx(h[e["step"]][0], rel=1e-12)
        assert e["alphadecay/weight_decay_mean"] == pytest.approx(np.mean(h[e["step"]]), rel=1e-12)
        assert math.isfinite(e["alphadecay/alpha/" + cb.decay.names[-1]])
        assert e["alphadecay/version"] == 1 + e["step"] // 3


@pytest.mark.parametrize("restore", [False, True], ids=["from_state", "hf_restores_callback"])
def test_resume_restores_decays(tmp_path, restore):
    _, cb_a, rec_a = run(tmp_path / "a", max_steps=6, interval=2, save_steps=3)
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert ckpt.is_dir()
    _, cb_b, rec_b = run(
        tmp_path / "b", max_steps=6, interval=2, resume=str(ckpt), model=tiny_llama(1), restore=restore
    )
    # at resume time (step 3) the decays are the saved ones (from step 2's weights), not recomputed from step 3's
    assert sorted(rec_b.hist) == [3, 4, 5, 6]
    assert rec_b.hist[3] == rec_a.hist[3]
    assert cb_b.decay.version == 4 and cb_b.decay.step == 6 and cb_b.decay.last_update_step == 6
    for s in (4, 5, 6):
        np.testing.assert_allclose(rec_b.hist[s], rec_a.hist[s], rtol=1e-4)


def test_resume_without_saved_state_recomputes_with_warning(tmp_path):
    # a checkpoint written without the callback: resume recomputes from the weights and counts from global_step
    model = tiny_llama(0)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "a", 2, save_steps=2),
        train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=opt_kwargs(),
    )
    trainer.train()
    with pytest.warns(UserWarning, match="without a saved AlphaDecay state"):
        _, cb, _ = run(
            tmp_path / "b", max_steps=3, interval=2, resume=str(tmp_path / "a" / "checkpoint-2"), model=tiny_llama(0)
        )
    assert cb.decay.step == 3 and cb.decay.version == 1


def test_state_loaded_before_a_fresh_run_is_kept(tmp_path):
    """DecayCallbackBase's contract: a state given by load_state_dict before the controller exists is loaded
    into it, also when the Trainer starts at step 0 (it was dropped unless resuming)."""
    _, cb_a, _ = run(tmp_path / "a", max_steps=3, interval=2)
    saved = cb_a.decay.state_dict()
    assert saved["step"] == 3
    model = tiny_llama(0)
    cb = AlphaDecayCallback(interval=2)
    cb.load_state_dict(saved)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "b", 1),
        train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=opt_kwargs(),
        callbacks=[cb],
    )
    trainer.train()
    assert (cb.decay.step, cb.decay.version) == (4, saved["version"] + 1)  # step 4 recomputes (interval 2)


def test_callback_rejects_the_default_optimizers_groups_naming_the_call(tmp_path):
    cb = AlphaDecayCallback(interval=2, select=r"mlp")
    trainer = Trainer(
        model=tiny_llama(0), args=training_args(tmp_path, 2), train_dataset=TokenDataset(), callbacks=[cb]
    )
    with pytest.raises(lw.GroupLayoutError, match=r"layerwise_optimizer\(\.\.\., per_matrix='mlp'\)"):
        trainer.train()
    with pytest.raises(TypeError, match="select"):
        AlphaDecayCallback(select=lambda n, p: True)
    with pytest.raises(TypeError, match=r"\['split_matrices'\] were replaced by per_matrix"):
        build_optimizer(tiny_llama(0), "adamw", split_matrices=False)


def test_move_callback_first(tmp_path):
    cb = AlphaDecayCallback(interval=2)
    trainer = Trainer(
        model=tiny_llama(0),
        args=training_args(tmp_path, 1),
        train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=opt_kwargs(),
        callbacks=[cb],
    )
    assert trainer.callback_handler.callbacks[0] is not cb
    move_callback_first(trainer, AlphaDecayCallback)
    assert trainer.callback_handler.callbacks[0] is cb
    with pytest.raises(ValueError, match="no callback"):
        move_callback_first(trainer, MultiplierClipCallback(1.0))


def test_multiplier_clip_excludes_multipliers(tmp_path):
    model = tiny_llama(0)
    mults = lw.add_multipliers(model)
    max_norm = 1e-3
    seen = {}

    class Before(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen["mult_before"] = [p.grad.clone() for p in mults]
            seen["norm_before"] = torch.linalg.vector_norm(
                torch.stack(
                    [
                        torch.linalg.vector_norm(p.grad.double())
                        for n, p in model.named_parameters()
                        if not n.endswith("_multiplier") and p.grad is not None
                    ]
                )
            )

    class After(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen["mult_after"] = [p.grad.clone() for p in mults]
            seen["norm_after"] = torch.linalg.vector_norm(
                torch.stack(
                    [
                        torch.linalg.vector_norm(p.grad.double())
                        for n, p in model.named_parameters()
                        if not n.endswith("_multiplier") and p.grad is not None
                    ]
                )
            )

    clip = MultiplierClipCallback(max_norm)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, 1, max_grad_norm=0.0),
        train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=opt_kwargs("adamw"),
        callbacks=[Before(), clip, After()],
    )
    trainer.train()
    assert seen["norm_before"] > 10 * max_norm
    assert float(seen["norm_after"]) == pytest.approx(max_norm, rel=1e-5)
    assert float(clip.last_norm) == pytest.approx(float(seen["norm_before"]), rel=1e-5)
    for a, b in zip(seen["mult_before"], seen["mult_after"]):
        assert torch.equal(a, b)
    bad = Trainer(
        model=tiny_llama(0),
        args=training_args(tmp_path / "x", 1, max_grad_norm=1.0),
        train_dataset=TokenDataset(),
        optimizer_cls_and_kwargs=opt_kwargs("adamw"),
        callbacks=[MultiplierClipCallback(1.0)],
    )
    with pytest.raises(ValueError, match="max_grad_norm"):
        bad.train()


def test_save_merged_loads_into_plain_llama(tmp_path):
    model = tiny_llama(0)
    lw.add_multipliers(model, kind="rowcol", placement="paper")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in lw.multipliers.multiplier_parameters(model):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    model.eval()
    ids = TokenDataset(4, seed=5).x
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    save_merged(model, tmp_path / "merged")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(n.endswith("_multiplier") for n, _ in plain.named_parameters())
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    plain.eval()
    with torch.no_grad():
        out = plain(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the source model keeps its multipliers
    assert any(n.endswith("row_multiplier") for n, _ in model.named_parameters())
    # the state dict matches lw.merge_multipliers applied in place
    sd = merged_state_dict(model)
    lw.merge_multipliers(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=1e-7)


def test_save_merged_refuses_unfolded_mup_then_saves_folded(tmp_path):
    model = tiny_llama(0)  # width 16, its base: the same config at width 8 on the meta device
    base_cfg = LlamaConfig(**{**model.config.to_dict(), "hidden_size": 8, "intermediate_size": 20, "head_dim": 4})
    with torch.device("meta"):
        base = LlamaForCausalLM(base_cfg)
    rule = lw.WidthScaling.from_models(model, base=base)
    rule.apply_(model)
    model.eval()
    ids = TokenDataset(4, seed=5).x
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with pytest.raises(ValueError, match=r"fold_\(model\)"):
        save_merged(model, tmp_path / "unfolded")
    assert not (tmp_path / "unfolded").exists()
    rule.fold_(model)
    save_merged(model, tmp_path / "folded")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "folded").eval()
    with torch.no_grad():
        out = plain(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_save_merged_rejects_tied_multiplied_embedding(tmp_path):
    model = tiny_llama(0, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lw.add_multipliers(model)
    with pytest.raises(ValueError, match="tied"):
        save_merged(model, tmp_path / "m")
