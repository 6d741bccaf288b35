"""Learnable multipliers: placement, names, gradient formulas (float64), merging, save/load, HF LLaMA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerwise as lw
from layerwise.lab.model import build_model
from layerwise.multipliers import (
    IMPLS,
    KINDS,
    MultipliedEmbedding,
    MultipliedLinear,
    add_multipliers,
    merge_multipliers,
    merge_multipliers_state_dict,
    multiplier_parameters,
    multiplier_stats,
    set_multiplier_impl,
)

VOCAB = 64
BLOCK_TYPES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def _nano(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("nano", vocab_size=VOCAB).to(dtype)


def _block_modules(num_layers: int = 2, prefix: str = "") -> list[str]:
    return [f"{prefix}layers.{i}.{part}.{m}" for i in range(num_layers) for part, ms in BLOCK_TYPES.items() for m in ms]


def _randomise(params, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype) + 0.5)


def _idx(seed: int = 2, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- placement & names
def test_paper_placement_names_preserved_head_untouched():
    model = _nano()
    before = dict(model.named_parameters())
    idx = _idx()
    ref_out = model(idx)
    mults = add_multipliers(model, kind="rowcol", placement="paper")
    after = dict(model.named_parameters())
    # every original parameter keeps its name and is the very same Parameter object
    for name, p in before.items():
        assert after[name] is p
    expected = {f"{m}.{s}" for m in _block_modules() + ["embed_tokens"] for s in ("row_multiplier", "col_multiplier")}
    assert set(after) - set(before) == expected
    assert {id(p) for p in mults} == {id(after[n]) for n in expected} and len(mults) == len(expected)
    assert not any(n.startswith("lm_head.") and n != "lm_head.weight" for n in after)
    assert type(model.lm_head) is nn.Linear
    # shapes follow the stored weight: rows = dim 0 (out_features / vocabulary), cols = dim 1
    assert after["layers.0.mlp.down_proj.row_multiplier"].shape == (32,)
    assert after["layers.0.mlp.down_proj.col_multiplier"].shape == (88,)
    assert after["embed_tokens.row_multiplier"].shape == (VOCAB,)
    assert after["embed_tokens.col_multiplier"].shape == (32,)
    assert all(torch.equal(p, torch.ones_like(p)) for p in mults)
    # init at 1: the function is unchanged; wrappers are still Linear/Embedding
    torch.testing.assert_close(model(idx), ref_out, rtol=0, atol=0)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)
    assert isinstance(model.embed_tokens, MultipliedEmbedding)
    assert [n for n, _ in multiplier_parameters(model)] == [n for n in after if n in expected]
    # the anatomy still sees the wrapped block weights as the same block matrices
    assert [r.name for r in lw.anatomy(model).block_matrices()] == [
        r.name for r in lw.anatomy(_nano()).block_matrices()
    ]


@pytest.mark.parametrize(
    "kind, per_type",
    [
        ("rowcol", {"q_proj": ("row",), "o_proj": ("row", "col"), "gate_proj": ("row",), "down_proj": ("row", "col")}),
        ("row", {"q_proj": ("row",), "o_proj": ("row",), "gate_proj": ("row",), "down_proj": ("row",)}),
        ("col", {"o_proj": ("col",), "down_proj": ("col",)}),
        ("scalar", {"q_proj": ("scalar",), "o_proj": ("scalar",), "gate_proj": ("scalar",), "down_proj": ("scalar",)}),
    ],
)
def test_symmetry_free_placement(kind, per_type):
    model = _nano()
    add_multipliers(model, kind=kind, placement="symmetry_free")
    got = {n for n, _ in multiplier_parameters(model)}
    want = set()
    for i in range(2):
        for mod, parts in per_type.items():
            part = "self_attn" if mod in BLOCK_TYPES["self_attn"] else "mlp"
            want |= {f"layers.{i}.{part}.{mod}.{p}_multiplier" for p in parts}
    assert got == want
    if kind == "scalar":
        assert model.get_parameter("layers.0.mlp.down_proj.scalar_multiplier").shape == (1,)


def test_callable_placement_and_dtype():
    model = _nano(dtype=torch.float64)

    def place(name, module):
        if name.endswith("v_proj"):
            return "scalar"
        return True if name.endswith("up_proj") else None

    add_multipliers(model, kind="col", placement=place)
    names = {n: p for n, p in multiplier_parameters(model)}
    assert set(names) == {f"layers.{i}.self_attn.v_proj.scalar_multiplier" for i in range(2)} | {
        f"layers.{i}.mlp.up_proj.col_multiplier" for i in range(2)
    }
    assert all(p.dtype == torch.float64 for p in names.values())


def test_bad_arguments_and_double_application():
    model = _nano()
    with pytest.raises(ValueError, match="kind 'diag'"):
        add_multipliers(model, kind="diag")
    with pytest.raises(ValueError, match="placement 'everywhere'"):
        add_multipliers(model, placement="everywhere")
    with pytest.raises(ValueError, match="impl 'fast'"):
        add_multipliers(model, impl="fast")
    with pytest.raises(ValueError, match="q_proj"):
        add_multipliers(model, placement=lambda n, m: "bogus" if n.endswith("q_proj") else None)
    assert not multiplier_parameters(model)  # failed calls changed nothing
    add_multipliers(model)
    with pytest.raises(ValueError, match="already has multipliers"):
        add_multipliers(model, placement="symmetry_free")
    with pytest.raises(ValueError, match="impl 'x'"):
        set_multiplier_impl(model, "x")
    merge_multipliers(model)
    add_multipliers(model)  # allowed again after merging


# ----------------------------------------------------------------------------------------- gradient formulas
def _expected_grads(w, r, c, s, g):
    """docs/methods.md §3 formulas, written with explicit broadcasting (G = dL/dW~)."""
    one_r = r if r is not None else torch.ones(w.shape[0], dtype=w.dtype)
    one_c = c if c is not None else torch.ones(w.shape[1], dtype=w.dtype)
    one_s = s if s is not None else torch.ones(1, dtype=w.dtype)
    rc = one_r[:, None] * one_c[None, :]
    out = {"weight": one_s * rc * g}
    if r is not None:
        out["row_multiplier"] = one_s * (w * one_c[None, :] * g).sum(1)
    if c is not None:
        out["col_multiplier"] = one_s * (one_r[:, None] * w * g).sum(0)
    if s is not None:
        out["scalar_multiplier"] = (rc * w * g).sum().reshape(1)
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_linear_gradients_match_formulas(impl, kind):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=True).double()
    mod = MultipliedLinear(lin, kind, impl)
    _randomise(mod.multipliers().values())
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    R = torch.randn(2, 4, 3, dtype=torch.float64)
    y = mod(x)
    r, c, s = mod.row_multiplier, mod.col_multiplier, mod.scalar_multiplier
    w_eff = lin.weight.detach().clone()
    for t, shape in ((r, (-1, 1)), (c, (1, -1)), (s, (1, 1))):
        if t is not None:
            w_eff = w_eff * t.detach().reshape(shape)
    torch.testing.assert_close(y, x.detach() @ w_eff.T + lin.bias.detach(), rtol=1e-12, atol=1e-12)
    (y * R).sum().backward()
    g = R.reshape(-1, 3).T @ x.detach().reshape(-1, 5)  # dL/dW~ for L = sum(R * (x W~^T + b))
    exp = _expected_grads(lin.weight.detach(), *(t.detach() if t is not None else None for t in (r, c, s)), g)
    for name, want in exp.items():
        torch.testing.assert_close(getattr(mod, name).grad, want, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(mod.bias.grad, R.sum((0, 1)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, R @ w_eff, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["io", "materialize"])
@pytest.mark.parametrize("kind", KINDS)
def test_embedding_gradients_match_formulas(impl, kind):
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4).double()
    mod = MultipliedEmbedding(emb, kind, impl)
    _randomise(mod.multipliers().values())
    idx = torch.tensor([[0, 3, 3, 6], [1, 3, 0, 2]])
    R = torch.randn(2, 4, 4, dtype=torch.float64)
    (mod(idx) * R).sum().backward()
    g = torch.zeros(7, 4, dtype=torch.float64).index_add_(0, idx.reshape(-1), R.reshape(-1, 4))
    r, c, s = (
        t.detach() if t is not None else None for t in (mod.row_multiplier, mod.col_multiplier, mod.scalar_multiplier)
    )
    for name, want in _expected_grads(emb.weight.detach(), r, c, s, g).items():
        torch.testing.assert_close(getattr(mod, name).grad, want, rtol=1e-12, atol=1e-12, msg=name)


def test_impls_agree_on_whole_model():
    model = _nano(dtype=torch.float64)
    mults = add_multipliers(model)
    _randomise(mults)
    idx = _idx()
    results = []
    for impl in IMPLS:
        set_multiplier_impl(model, impl)
        model.zero_grad()
        out = model(idx)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=1e-10, atol=1e-12)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------- merge, save/load
@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_fp32(kind):
    model = _nano()
    plain_names = [n for n, _ in model.named_parameters()]
    mults = add_multipliers(model, kind=kind)
    _randomise(mults)
    idx = _idx()
    with torch.no_grad():
        out = model(idx)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        q_weight = model.layers[0].self_attn.q_proj.weight
        merged = merge_multipliers(model)
        assert merged is model
        out_merged = model(idx)
    assert (out_merged - out).abs().max() <= 1e-6 * out.abs().max()
    assert [n for n, _ in model.named_parameters()] == plain_names
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    assert model.layers[0].self_attn.q_proj.weight is q_weight  # merged in place
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the pure state-dict version gives the same weights, without touching its input
    sd_before = {k: v.clone() for k, v in sd.items()}
    msd = merge_multipliers_state_dict(sd)
    assert all(torch.equal(sd[k], sd_before[k]) for k in sd)
    fresh = _nano(seed=5)
    fresh.load_state_dict(msd)  # strict: exactly the plain model's keys
    for (n, a), (_, b) in zip(fresh.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_forward_hooks_move_with_the_wrapped_module():
    """A forward pre-hook on a module that add_multipliers wraps (μP's readout multiplier from
    WidthScaling.apply_ is one) keeps acting on the wrapper and on the merged module, and its handle still
    removes it; a module with a backward hook is refused, naming it."""
    model = _nano().eval()
    idx = _idx()
    with torch.no_grad():
        plain = model(idx)
    q = model.layers[0].self_attn.q_proj
    handle = q.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
    with torch.no_grad():
        hooked = model(idx)
    assert not torch.allclose(hooked, plain)
    add_multipliers(model)
    wrapped = model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, MultipliedLinear) and wrapped is not q
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hooked, rtol=0, atol=0)  # multipliers at 1: the hook still acts
        merge_multipliers(model)
        assert type(model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(model(idx), hooked, rtol=1e-6, atol=1e-6)
        handle.remove()
        torch.testing.assert_close(model(idx), plain, rtol=1e-6, atol=1e-6)

    other = _nano()
    other.layers[1].mlp.down_proj.register_full_backward_hook(lambda mod, gin, gout: None)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*backward hooks"):
        add_multipliers(other)
    assert not any(isinstance(m, MultipliedLinear) for m in other.modules())  # refused before wrapping any


def test_merge_state_dict_errors():
    with pytest.raises(ValueError, match="no weight entry 'a.b.weight'"):
        merge_multipliers_state_dict({"a.b.row_multiplier": torch.ones(3)})
    with pytest.raises(ValueError, match="do not fit"):
        merge_multipliers_state_dict({"a.weight": torch.ones(3, 2), "a.col_multiplier": torch.ones(3)})


def test_merge_with_tied_embedding_unties():
    model = _nano()
    model.lm_head.weight = model.embed_tokens.weight
    head_before = model.lm_head.weight.detach().clone()
    mults = add_multipliers(model)
    _randomise(mults)
    idx = _idx()
    with torch.no_grad():
        out = model(idx)
        merge_multipliers(model)
        torch.testing.assert_close(model(idx), out, rtol=1e-6, atol=1e-6)
    assert torch.equal(model.lm_head.weight, head_before)
    assert model.embed_tokens.weight is not model.lm_head.weight


def test_save_load_with_multipliers():
    model = _nano()
    mults = add_multipliers(model, kind="rowcol", placement="paper")
    _randomise(mults)
    idx = _idx()
    with torch.no_grad():
        out = model(idx)
    sd = model.state_dict()
    fresh = _nano(seed=9)
    add_multipliers(fresh, kind="rowcol", placement="paper")
    fresh.load_state_dict(sd)  # strict
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), out, rtol=0, atol=0)
    plain = _nano(seed=9)
    with pytest.raises(RuntimeError, match="row_multiplier"):
        plain.load_state_dict(sd)  # a multiplier checkpoint needs wrapping or merge_multipliers_state_dict


# ----------------------------------------------------------------------------------------- diagnostics
def test_multiplier_stats():
    model = _nano()
    assert multiplier_stats(model) == {}
    add_multipliers(model, placement="paper")
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.row_multiplier.fill_(2.0)
        model.layers[1].self_attn.k_proj.row_multiplier.copy_(torch.tensor([1.0, 3.0] * 16))
    stats = multiplier_stats(model)
    assert stats["qk_ratio/layer0"] == pytest.approx(2.0)
    assert stats["qk_ratio/layer1"] == pytest.approx(1.0 / 5**0.5)
    assert stats["qk_ratio/max_abs_log"] == pytest.approx(
        max(abs(torch.tensor(2.0).log().item()), 0.5 * torch.tensor(5.0).log().item())
    )
    assert stats["q/row_mean"] == pytest.approx(1.5)  # layer 0 all 2, layer 1 all 1
    assert stats["k/row_rms"] == pytest.approx(((32 + 16 * 1 + 16 * 9) / 64) ** 0.5)
    assert stats["embed/col_mean"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- Hugging Face LLaMA
def test_hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    before = dict(model.named_parameters())
    idx = _idx()
    with torch.no_grad():
        ref = model(idx).logits
    mults = add_multipliers(model, placement="paper")
    after = dict(model.named_parameters())
    assert all(after[n] is p for n, p in before.items())
    expected = {
        f"{m}.{s}"
        for m in _block_modules(prefix="model.") + ["model.embed_tokens"]
        for s in ("row_multiplier", "col_multiplier")
    }
    assert set(after) - set(before) == expected
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, ref, rtol=0, atol=0)
    _randomise(mults)
    with torch.no_grad():
        out = model(idx).logits
        assert not torch.allclose(out, ref)
        merge_multipliers(model)
        assert (model(idx).logits - out).abs().max() <= 1e-6 * out.abs().max()
    assert set(dict(model.named_parameters())) == set(before)


def test_paper_placement_on_unfamiliar_names():
    """Inside blocks every Linear is wrapped whatever its name; outside, only the token embedding."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.output = nn.Linear(4, 4)  # BERT-style name that module_type would call "head"
            self.norm = nn.LayerNorm(4)

    toy = nn.Module()
    toy.wte = nn.Embedding(10, 4)
    toy.wpe = nn.Embedding(8, 4)  # position embedding: not the token embedding
    toy.h = nn.ModuleList([Block(), Block()])
    toy.output = nn.Linear(4, 10)
    add_multipliers(toy, kind="row")
    assert {n for n, _ in multiplier_parameters(toy)} == {
        "wte.row_multiplier",
        "h.0.output.row_multiplier",
        "h.1.output.row_multiplier",
    }


def test_multipliers_added_after_the_optimizer_warn_at_its_second_step():
    """The README's old order (optimizer first, add_multipliers after): the multipliers never train."""
    import warnings

    from layerwise import _coverage
    from layerwise._coverage import UntrainedParameterWarning

    _coverage._stop()  # forget multipliers that earlier tests made and never trained

    def loop(model, opt, steps=3):
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()

    torch.manual_seed(0)
    late = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.AdamW(late.parameters(), lr=1e-2)
    mults = add_multipliers(late, kind="row", placement=lambda name, mod: True)
    with pytest.warns(UntrainedParameterWarning, match=r"2 learnable multiplier\(s\) \(e\.g\. 0\.row_multiplier"):
        loop(late, opt)
    assert all(torch.equal(m, torch.ones_like(m)) for m in mults)  # what the warning is about

    right = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    mults = add_multipliers(right, kind="row", placement=lambda name, mod: True)
    opt = torch.optim.AdamW(right.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedParameterWarning)
        loop(right, opt)
    assert not all(torch.equal(m, torch.ones_like(m)) for m in mults)
