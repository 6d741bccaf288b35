from __future__ import annotations

import pytest
import torch

from layerwise.lab.model import build_model

VOCAB = 64


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("nano", vocab_size=VOCAB)


def batches(n: int, seed: int = 123, b: int = 2, t: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (b, t), generator=g) for _ in range(n)]


def train_step(model, opt, x: torch.Tensor) -> None:
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def block_linear_weights(model):
    """Reference list of the lab model's block matrices, written independently of layerwise.anatomy:
    the nn.Linear weights under ``layers.N.`` (q, k, v, o, gate, up, down), in model order."""
    return [
        (f"{n}.weight", m.weight)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("layers.")
    ]


def layer_index(name):
    """Block index of a lab-model name (``layers.3.mlp...`` -> 3), else None (hand-written reference)."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def per_matrix_optimizer(model, cls=torch.optim.AdamW, **kw):
    """``cls`` over hand-made groups: one per block matrix (:func:`block_linear_weights`), one with the rest;
    every group takes the optimizer's defaults (``kw``).  The layout the controllers need, built without
    ``layerwise.param_groups``."""
    mats = [w for _, w in block_linear_weights(model)]
    ids = {id(w) for w in mats}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return cls([{"params": [w]} for w in mats] + [{"params": rest}], **kw)


def hf_llama(seed: int = 0, hidden: int = 32, intermediate: int = 64, heads: int = 2, kv_heads: int = 2):
    """A tiny Hugging Face ``LlamaForCausalLM`` with attention and MLP biases (two layers, untied head)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)
