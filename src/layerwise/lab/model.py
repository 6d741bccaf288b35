"""The reference model: a LLaMA-style decoder in one readable file.

RMSNorm, rotary position embeddings, SwiGLU MLP, optional grouped-query attention, untied LM head.
Parameter names are Hugging Face LLaMA's (``embed_tokens``, ``layers.N.self_attn.q_proj``, ...,
``layers.N.mlp.down_proj``, ``norm``, ``lm_head``; HF puts all but the head under ``model.``), so every
name-based rule in layerwise works the same on this model and on ``LlamaForCausalLM``.

Initialisation follows the AlphaDecay authors' code: every weight matrix and the embedding ~ N(0, 0.02²),
norm weights 1.  With ``parametrization="mup"`` (see :mod:`layerwise.scaling`), width ``d = hidden_size``
is measured against ``base_hidden_size`` (``m = d / d_base``):

* hidden matrices (q/k/v/o, gate/up/down): init std ``init_std / sqrt(m)`` (variance ∝ 1/fan_in);
* embedding: init std ``init_std`` (unchanged);
* readout: logits multiplied by ``1/m`` (mup's ``MuReadout`` convention), init std ``init_std``;
* attention logits scaled by ``1/head_dim`` instead of ``1/sqrt(head_dim)`` when ``attn_scale="mup"``
  (a separate switch: it changes the model even at m = 1).

``m`` is measured on ``hidden_size`` alone, so grow ``intermediate_size`` in proportion (as ``layerwise sweep``
does) for ``down_proj``'s fan-in to scale with it.  At ``m = 1`` (and ``attn_scale="sqrt"``) the μP model is
exactly the standard one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    hidden_size: int = 128
    intermediate_size: int = 352
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = same as num_heads (no grouped-query attention)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    parametrization: str = "sp"  # "sp" | "mup"
    base_hidden_size: int = 0  # muP base width; 0 = hidden_size (m = 1)
    attn_scale: str = "sqrt"  # "sqrt": 1/sqrt(head_dim); "mup": 1/head_dim

    def __post_init__(self) -> None:
        if self.num_kv_heads == 0:
            self.num_kv_heads = self.num_heads
        if self.base_hidden_size == 0:
            self.base_hidden_size = self.hidden_size
        checks = {
            "vocab_size": self.vocab_size > 0,
            "hidden_size": self.hidden_size > 0 and self.hidden_size % self.num_heads == 0,
            "intermediate_size": self.intermediate_size > 0,
            "num_layers": self.num_layers > 0,
            "num_heads": self.num_heads > 0,
            "num_kv_heads": self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
            "max_seq_len": self.max_seq_len > 0,
            "init_std": self.init_std > 0,
            "base_hidden_size": self.base_hidden_size > 0,
            "parametrization": self.parametrization in ("sp", "mup"),
            "attn_scale": self.attn_scale in ("sqrt", "mup"),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid model config field(s) {bad}: hidden_size must be divisible by num_heads, num_heads by "
                f"num_kv_heads, sizes positive, parametrization in ('sp', 'mup'), attn_scale in ('sqrt', 'mup'); got "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def width_mult(self) -> float:
        """μP width multiplier m = hidden_size / base_hidden_size (1 under standard parametrisation)."""
        return self.hidden_size / self.base_hidden_size if self.parametrization == "mup" else 1.0

    def to_dict(self) -> dict:
        return asdict(self)


#: Named sizes.  ``tiny`` is for CPU demos and tests; the ``llama-*`` sizes are the AlphaDecay paper's.
SIZES: dict[str, dict] = {
    "nano": dict(hidden_size=32, intermediate_size=88, num_layers=2, num_heads=2, max_seq_len=64),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, max_seq_len=256),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, max_seq_len=256),
    "llama-135m": dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, max_seq_len=256),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_layers=24, num_heads=16, max_seq_len=256),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_layers=24, num_heads=32, max_seq_len=256),
}


def model_config(size: str = "tiny", **overrides) -> ModelConfig:
    """The config of a named size, with field overrides (``model_config("tiny", vocab_size=4096)``)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    names = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown model config field(s) {sorted(unknown)}; valid: {sorted(names)}")
    return replace(ModelConfig(**SIZES[size]), **overrides) if overrides else ModelConfig(**SIZES[size])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (seq_len, head_dim) in HF LLaMA's "rotate half" layout, computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by position: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = 1.0 / self.head_dim if cfg.attn_scale == "mup" else 1.0 / math.sqrt(self.head_dim)
        d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Decoder-only LM.  ``forward(idx)`` -> logits; ``forward(idx, targets)`` -> (logits, mean loss)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cos, sin = rotary_cos_sin(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @property
    def readout_mult(self) -> float:
        return 1.0 / self.config.width_mult

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        hidden_std = cfg.init_std / math.sqrt(cfg.width_mult)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                std = cfg.init_std if name == "lm_head" else hidden_std
                nn.init.normal_(mod.weight, mean=0.0, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed_tokens(idx)
        for block in self.layers:
            x = block(x, cos, sin)
        h = self.norm(x)
        if self.config.width_mult != 1.0:
            # the μP readout multiplier, applied to the head's input: (h/m)·Wᵀ = (h·Wᵀ)/m, and h has
            # hidden_size entries per token where the logits have vocab_size (8-60x fewer to scale, fwd and bwd)
            h = h * self.readout_mult
        logits = self.lm_head(h)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n


def build_model(size: str = "tiny", **overrides) -> LlamaModel:
    return LlamaModel(model_config(size, **overrides))
