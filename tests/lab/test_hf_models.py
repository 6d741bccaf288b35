"""Any Hugging Face causal LM in the harness: built from a config, trained with the methods, resumed, exported,
and used as the starting point of another run (model.init_from)."""

import json

import pytest
import torch
from tests._helpers import read_jsonl

from layerwise.lab import config as C
from layerwise.lab.config import ConfigError
from layerwise.lab.data import prepare_config
from layerwise.lab.export import export_run, load_run_model
from layerwise.lab.hf_models import build_hf_model, decoder_layers
from layerwise.lab.train import train

# transformers is the optional `hf` extra (an external package): without it these tests skip
transformers = pytest.importorskip("transformers")


def tiny_configs(vocab):
    """Tiny configs of four architectures (attention-only, Conv1D + tied embeddings, and the Mamba2 hybrid)."""
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {
        "llama": transformers.LlamaConfig(**common),
        "qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=False),
        "gpt2": transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
        "falcon_h1": transformers.FalconH1Config(
            **common, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16
        ),
    }


def base_cfg(corpus, *over):
    return C.resolve(
        "smoke",
        None,
        [
            f"data.corpus={corpus}",
            "train.progress=false",
            "train.tensorboard=false",
            "train.max_steps=4",
            "train.eval_every=0",
            "train.log_every=2",
            "train.batch_size=2",
            "train.diagnostics_every=2",
            *over,
        ],
    )


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, corpus_file):
    vocab = prepare_config(base_cfg(corpus_file).data).vocab_size
    root = tmp_path_factory.mktemp("hf_configs")
    out = {}
    for name, c in tiny_configs(vocab).items():
        c.save_pretrained(str(root / name))
        out[name] = root / name
    return out


# GPT-2 ties its embeddings and uses Conv1D: AlphaDecay (multipliers on it are the anatomy issue's)
METHOD = {
    "llama": "multipliers.kind=rowcol",
    "qwen2": "optim.name=alphaadam",
    "gpt2": "decay.name=alphadecay",
    "falcon_h1": "multipliers.kind=rowcol",
}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "falcon_h1"])
def test_train_export_reload_and_init_from(arch, hf_dirs, corpus_file, tmp_path):
    cfg = base_cfg(corpus_file, f"model.hf_config={hf_dirs[arch]}", METHOD[arch], "decay.interval=2")
    s = train(cfg, tmp_path / "run", quiet=True)
    assert s["steps"] == 4 and s["final_val_loss"] < 7.0
    assert json.loads((tmp_path / "run" / "hf_config.json").read_text())["model_type"] == arch
    if "decay" in METHOD[arch]:
        rows = read_jsonl(tmp_path / "run" / "spectral.jsonl")
        assert rows[-1]["step"] == 4 and len(rows[-1]["rows"]) > 0
    out = export_run(tmp_path / "run", tmp_path / "hf")
    model, _, _ = load_run_model(tmp_path / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == type(model).__name__ and not any("multiplier" in k for k in hf.state_dict())
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-5
    # continued training starts from exactly the exported weights
    cont = base_cfg(corpus_file, f"model.init_from={out}")
    torch.manual_seed(123)
    start, _ = build_hf_model(cont, hf.config.vocab_size)
    sd = hf.state_dict()
    for k, v in start.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)


def test_hf_resume_equals_uninterrupted_and_layers(hf_dirs, corpus_file, tmp_path):
    over = [
        f"model.hf_config={hf_dirs['qwen2']}",
        "multipliers.kind=rowcol",
        "optim.schedule=wsd",
        "optim.decay_frac=0.5",
        "train.max_steps=6",
    ]
    full = train(base_cfg(corpus_file, *over), tmp_path / "full", quiet=True)
    part = train(base_cfg(corpus_file, *over, "train.stop_at=3"), tmp_path / "part", quiet=True)
    assert part["stopped_at"] == 3
    cfg = C.apply_overrides(base_cfg(corpus_file, *over), {"train.stop_at": 0})
    resumed = train(cfg, tmp_path / "part", resume=True, quiet=True)
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)
    a = torch.load(tmp_path / "full/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part/checkpoints/last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(3e-3)  # wsd: stable at the peak before the cool-down (log at step 2)
    model, _, _ = load_run_model(tmp_path / "full")
    assert [type(m).__name__ for m in decoder_layers(model)] == ["Qwen2DecoderLayer"] * 2


def test_hf_config_errors(hf_dirs, corpus_file, tmp_path):
    def build(*over):
        return build_hf_model(base_cfg(corpus_file, *over), 300)

    with pytest.raises(ConfigError, match="model.hf_config.*neither a config.json"):
        build(f"model.hf_config={tmp_path / 'missing'}")
    (tmp_path / "nt.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(ConfigError, match="no 'model_type'"):
        build(f"model.hf_config={tmp_path / 'nt.json'}")
    transformers.ViTConfig().save_pretrained(str(tmp_path / "vit"))
    with pytest.raises(ConfigError, match="not a causal LM"):
        build(f"model.hf_config={tmp_path / 'vit'}")
    with pytest.raises(ConfigError, match="parametrization='mup' builds a fresh"):
        build(f"model.init_from={hf_dirs['llama']}", "model.parametrization=mup")
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        build(f"model.hf_config={hf_dirs['llama']}", "data.seq_len=128")
    with pytest.warns(UserWarning, match="vocab_size .* replaced by the data tokenizer's 300"):
        model, config = build(f"model.hf_config={hf_dirs['llama']}")
    assert model.get_input_embeddings().weight.shape[0] == 300


def sweep_overrides(corpus, hf_dir):
    """Two-step runs of an HF config, for the sweep tests."""
    return [
        "train.progress=false",
        "train.tensorboard=false",
        f"data.corpus={corpus}",
        "train.max_steps=2",
        "train.eval_every=0",
        "train.log_every=1",
        "train.batch_size=2",
        f"model.hf_config={hf_dir}",
    ]


def test_sweep_resizes_an_hf_config(hf_dirs, corpus_file, tmp_path):
    from layerwise.lab.sweep import sweep

    over = sweep_overrides(corpus_file, hf_dirs["qwen2"])
    res = sweep("smoke", [32, 64], [3e-3], [0.1], ["sp"], tmp_path / "sw", overrides=over, quiet=True)
    assert res["widths"] == [32, 64]
    for w, heads in ((32, 1), (64, 2)):
        c = json.loads((tmp_path / "sw" / "sp" / f"w{w}" / "lr0.003_wd0.1" / "seed0" / "hf_config.json").read_text())
        assert (c["hidden_size"], c["num_attention_heads"], c.get("head_dim", w // heads)) == (w, heads, 32)
    with pytest.raises(ConfigError, match="cannot resize"):
        build_hf_model(base_cfg(corpus_file, f"model.init_from={hf_dirs['qwen2']}", "model.hidden_size=64"), 300)


def test_sweep_mup_on_an_hf_config_and_export(hf_dirs, corpus_file, tmp_path):
    """μP on an HF config: each width is made μP by WidthScaling.from_models against the sweep's base width
    (the optimizer's groups use its per-tensor factors), and the export folds the readout multiplier."""
    from layerwise.lab.methods import build_param_groups
    from layerwise.lab.sweep import sweep
    from layerwise.scaling.model_side import applied

    over = sweep_overrides(corpus_file, hf_dirs["llama"])
    res = sweep("smoke", [32, 64], [3e-3], [0.1], ["mup-sqrtwd"], tmp_path / "sw", overrides=over, quiet=True)
    assert set(res["parametrizations"]["mup-sqrtwd"]["grids"]) == {"32", "64"}
    run = tmp_path / "sw" / "mup-sqrtwd" / "w64" / "lr0.003_wd0.1" / "seed0"
    model, cfg, _ = load_run_model(run)
    state = applied(model)
    assert state is not None and state.rule.per_tensor and set(state.hooks) == {"lm_head"}
    groups = {n: g for g in build_param_groups(model, cfg, None) for n in g["param_names"]}
    q = groups["model.layers.0.self_attn.q_proj.weight"]
    assert (q["lr"], q["weight_decay"]) == (pytest.approx(3e-3 / 2), pytest.approx(0.1 * 2**0.5))
    assert groups["lm_head.weight"]["lr"] == pytest.approx(3e-3)
    out = export_run(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-5
    assert json.loads((out / "layerwise_export.json").read_text())["parametrization"] == "mup"


@pytest.mark.parametrize(
    "hidden, heads, kv, base, expect",
    [
        (256, 8, 8, 64, (64, 192, 2, 2, 32)),  # heads in proportion: the head size kept (as the sweep's widths)
        (128, 4, 2, 32, (32, 96, 4, 2, 8)),  # kv heads would be 0.5: neither changes, the head size shrinks
        (128, 4, 4, -4, (32, 96, 1, 1, 32)),  # a negative base divides the hidden size
    ],
)
def test_base_hf_config(hidden, heads, kv, base, expect):
    from layerwise.lab.hf_models import base_hf_config

    cfg = C.resolve("smoke", None, [f"model.base_hidden_size={base}", "model.parametrization=mup"])
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
    )
    out = base_hf_config(cfg, config)
    got = (out.hidden_size, out.intermediate_size, out.num_attention_heads, out.num_key_value_heads, out.head_dim)
    assert got == expect
    assert config.hidden_size == hidden  # the run's config is not changed


@pytest.mark.parametrize(
    "name, kwargs, base, expect",
    [
        # a stored head_dim that is not hidden/heads (Qwen3-style): kept when the heads scale in proportion
        (
            "LlamaConfig",
            dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=32),
            32,
            dict(num_attention_heads=2, head_dim=32),
        ),
        # ... and shrunk by the width ratio (not to hidden/heads) when they cannot
        (
            "Qwen3Config",
            dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64),
            -4,
            dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        ),
        # Falcon derives head_dim (a read-only property): it follows by itself
        ("FalconConfig", dict(hidden_size=64, num_attention_heads=4), 32, dict(num_attention_heads=2, head_dim=16)),
        # Mamba2: SSM heads in proportion, head size kept (it has no num_attention_heads)
        ("Mamba2Config", dict(hidden_size=64, num_heads=8, head_dim=16, expand=2), 32, dict(num_heads=4, head_dim=16)),
        # Falcon-H1: the SSM width and heads scale too, so no block matrix keeps a fixed dimension
        (
            "FalconH1Config",
            dict(
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                mamba_d_ssm=64,
                mamba_n_heads=4,
                mamba_d_head=16,
            ),
            32,
            dict(intermediate_size=64, mamba_d_ssm=32, mamba_n_heads=2, mamba_d_head=16, head_dim=16),
        ),
        (
            "Qwen2MoeConfig",
            dict(
                hidden_size=64,
                intermediate_size=128,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=4,
            ),
            32,
            dict(intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=64),
        ),
    ],
)
def test_base_hf_config_other_families(name, kwargs, base, expect):
    from layerwise.lab.hf_models import base_hf_config

    cfg = C.resolve("smoke", None, [f"model.base_hidden_size={base}", "model.parametrization=mup"])
    config = getattr(transformers, name)(vocab_size=64, num_hidden_layers=2, **kwargs)
    out = base_hf_config(cfg, config)
    assert {k: getattr(out, k) for k in expect} == expect


def test_mup_on_models_it_cannot_handle_is_a_config_error(tmp_path):
    from layerwise.lab.hf_models import apply_mup, resolve_hf_config

    cfg = C.resolve("smoke", None, ["model.base_hidden_size=32", "model.parametrization=mup"])
    config = transformers.Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(C.ConfigError, match=r"mup.*Qwen2MoeForCausalLM.*model\.layers\.0\.mlp\.gate\.weight"):
        apply_mup(cfg, model, config)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # untouched

    config.save_pretrained(tmp_path / "llama")
    bad = C.resolve("smoke", None, [f"model.hf_config={tmp_path / 'llama'}", "model.attn_scale=mup"])
    with pytest.raises(C.ConfigError, match="model.attn_scale"):
        resolve_hf_config(bad, 64)


def test_width_override_on_a_config_that_derives_head_dim(tmp_path):
    """Falcon's head_dim is a read-only property: model.hidden_size resizes it through the config itself."""
    from layerwise.lab.hf_models import resolve_hf_config

    transformers.FalconConfig(
        vocab_size=64, hidden_size=64, num_attention_heads=4, num_hidden_layers=2
    ).save_pretrained(tmp_path)
    cfg = C.resolve("smoke", None, [f"model.hf_config={tmp_path}", "model.hidden_size=128"])
    out = resolve_hf_config(cfg, 64)
    assert (out.hidden_size, out.head_dim) == (128, 32)
