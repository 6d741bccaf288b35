"""A zoo of tiny models built from configs (no downloads): 2 layers, width 64, vocabulary 128.

Shared by the anatomy tests and any other test that wants real Hugging Face architectures.  Each builder
returns a freshly initialised model in eval mode with a fixed seed.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 128
WIDTH = 64
LAYERS = 2


def _seeded(fn):
    def build(seed: int = 0):
        torch.manual_seed(seed)
        model = fn()
        return model.eval()

    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    return build


def llama_config(
    hidden: int, inter: int, *, heads: int = 4, kv: int | None = None, tie: bool = False, vocab: int = 64, **extra
):
    """A 2-layer ``LlamaConfig`` of any width (``extra``: more config fields, e.g. ``attention_bias``)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv or heads,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        **extra,
    )


def build(cls, cfg, *, meta: bool = False, seed: int = 0):
    """``cls(cfg)`` on the meta device (shapes only), or initialised under ``seed``."""
    if meta:
        with torch.device("meta"):
            return cls(cfg)
    torch.manual_seed(seed)
    return cls(cfg)


def hf_llama(hidden: int, inter: int, *, meta: bool = False, seed: int = 0, **kw):
    """``LlamaForCausalLM`` of any width (the width-scaling tests build a model and its base with it)."""
    from transformers import LlamaForCausalLM

    return build(LlamaForCausalLM, llama_config(hidden, inter, **kw), meta=meta, seed=seed)


@_seeded
def llama():
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(WIDTH, 128, kv=2, vocab=VOCAB))


@_seeded
def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )


@_seeded
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_positions=64))


@_seeded
def gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )


@_seeded
def bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
    )


@_seeded
def roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=66,
            num_labels=3,
        )
    )


@_seeded
def falcon_h1():
    from transformers import FalconH1Config, FalconH1ForCausalLM

    return FalconH1ForCausalLM(
        FalconH1Config(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            mamba_d_ssm=64,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_d_state=16,
            mamba_n_groups=1,
            mamba_d_conv=4,
            mamba_expand=1,
            mamba_chunk_size=16,
            tie_word_embeddings=False,
        )
    )


@_seeded
def mamba2():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    return Mamba2ForCausalLM(
        Mamba2Config(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            num_hidden_layers=LAYERS,
            num_heads=8,
            head_dim=16,
            state_size=16,
            n_groups=1,
            expand=2,
            conv_kernel=4,
            chunk_size=16,
            tie_word_embeddings=False,
        )
    )


@_seeded
def lab_llama():
    from layerwise.lab.model import LlamaModel, ModelConfig

    return LlamaModel(
        ModelConfig(
            vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=128, num_layers=LAYERS, num_heads=4, max_seq_len=64
        )
    )


class HandMLP(nn.Module):
    """A hand-written classifier: input Linear, hidden layers in a ModuleList, classifier head."""

    def __init__(self, d_in: int = 32, width: int = WIDTH, depth: int = LAYERS, n_classes: int = 10):
        super().__init__()
        self.input = nn.Linear(d_in, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, n_classes)

    def forward(self, x):
        h = torch.relu(self.input(x))
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.classifier(self.norm(h))


@_seeded
def hand_mlp():
    return HandMLP()


#: name -> builder, in the order of the zoo table
BUILDERS = {
    "llama": llama,
    "qwen2": qwen2,
    "gpt2": gpt2,
    "gpt_neox": gpt_neox,
    "bert": bert,
    "roberta": roberta,
    "falcon_h1": falcon_h1,
    "mamba2": mamba2,
    "lab_llama": lab_llama,
    "hand_mlp": hand_mlp,
}


def example_input(name: str, model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict:
    """Keyword inputs for ``model(**inputs)``."""
    g = torch.Generator().manual_seed(seed)
    if name == "hand_mlp":
        return {"x": torch.randn(batch, 32, generator=g)}
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    if name == "lab_llama":
        return {"idx": ids}
    return {"input_ids": ids}


def logits(name: str, model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.logits
