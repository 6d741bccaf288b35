"""Peer oracle: the lab's reference LLaMA and Hugging Face ``LlamaForCausalLM`` built from the same sizes and
loaded with the same weights give the same logits (grouped-query attention, RoPE, RMSNorm, SwiGLU, untied head)."""

from __future__ import annotations

import pytest
import torch
import transformers

from layerwise.lab.model import build_model


def _pair(num_heads: int = 4, num_kv_heads: int = 2, dtype=torch.float64):
    torch.manual_seed(0)
    ours = (
        build_model(
            "nano", vocab_size=97, num_heads=num_heads, num_kv_heads=num_kv_heads, rope_theta=500.0, norm_eps=1e-5
        )
        .to(dtype)
        .eval()
    )
    c = ours.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype).eval()
    # HF names are ours under ``model.``, except the head
    sd = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    return ours, hf


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
def test_logits_equal_hf_llama_with_the_same_weights(heads):
    ours, hf = _pair(*heads)
    idx = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(input_ids=idx).logits
        got = ours(idx)
    assert got.shape == want.shape == (3, 21, 97)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)  # float64: only summation order differs
    # and the loss: HF shifts the labels itself, ours takes the shifted targets (ours is computed in fp32)
    with torch.no_grad():
        hf_loss = hf(input_ids=idx, labels=idx).loss
        _, our_loss = ours(idx[:, :-1], idx[:, 1:])
    assert float(our_loss) == pytest.approx(float(hf_loss), rel=1e-6)


def test_logits_equal_hf_llama_in_float32():
    ours, hf = _pair(dtype=torch.float32)
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(input_ids=idx).logits, rtol=1e-5, atol=1e-5)
