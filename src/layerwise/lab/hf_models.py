"""Any Hugging Face causal LM in the harness: ``model.hf_config`` / ``model.init_from``.

``model.hf_config = PATH`` (a ``config.json`` or a folder holding one) builds
``AutoModelForCausalLM.from_config`` under ``torch.manual_seed(train.seed)``, so seed k gives every method the
same initial weights, as for the reference model.  ``model.init_from = DIR`` loads the weights of a local HF
model folder instead (its own ``config.json`` unless ``hf_config`` is also given).

The model keeps its own class, module tree and parameter names (``model.layers.0.self_attn.q_proj.weight``,
``transformer.h.0.attn.c_attn.weight`` ...), so checkpoints are plain HF state dicts and every method sees the
same names it would see on the user's model.  Only ``forward`` is adapted to the trainer's contract —
``forward(idx) -> logits`` and ``forward(idx, targets) -> (logits, mean loss)`` with already-shifted targets —
by swapping the instance's class for a subclass of its own class (:func:`as_trainer_lm`); the exported model
(``layerwise export``) is the plain class again.

μP (``model.parametrization = "mup"``, ``layerwise sweep --parametrization mup*``): the model is built as
usual, then made μP by the library, :meth:`layerwise.WidthScaling.from_models` against the same architecture
at ``model.base_hidden_size`` (built on the meta device: the config with that hidden size, the FFN size in
proportion and the head size kept — the number of heads in proportion where it divides, as the sweep's
widths do) and ``rule.apply_(model)`` (init, readout multiplier, attention scale where the head size grows).
The rule then builds the parameter groups (:func:`layerwise.lab.methods.width_rule`).  The run records the
config *before* μP (a config-held multiplier such as Falcon-H1's ``lm_head_multiplier`` is re-derived on load);
``layerwise export`` folds the readout multiplier and attention scale into the weights.

Vocabulary: the embedding is sized to the data's tokenizer.  A config whose ``vocab_size`` differs is resized
with a warning (``from_config``); weights loaded by ``init_from`` must cover the tokenizer (else an error).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerwise.lab.config import Config, ConfigError

HF_CONFIG_NAME = "hf_config.json"  # the resolved HF config of a run, written into the run directory


def uses_hf(cfg: Config) -> bool:
    return bool(cfg.model.hf_config or cfg.model.init_from)


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is in the [hf] extra
        raise ConfigError(
            "model.hf_config / model.init_from need the 'transformers' package: pip install 'layerwise[hf]'"
        ) from e
    return transformers


def load_hf_config(path: str | Path, field: str = "model.hf_config"):
    """The ``PretrainedConfig`` of a ``config.json`` file or a folder holding one (no network)."""
    tr = _transformers()
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ConfigError(f"{field}: {path} is neither a config.json file nor a folder holding one")
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{field}: {p} is not readable JSON ({e})") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ConfigError(f"{field}: {p} has no 'model_type'; it is not a Hugging Face model config")
    try:
        return tr.AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{field}: transformers cannot read {p} ({e})") from e


def _check_causal_lm(config, field: str) -> None:
    tr = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"{field}: model_type {config.model_type!r} is not a causal LM known to transformers "
            f"{tr.__version__} (AutoModelForCausalLM)"
        )


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_hf_config(cfg: Config, vocab_size: int):
    """The HF config a run builds: ``hf_config`` (else ``init_from``'s), vocab sized to the data's tokenizer."""
    m = cfg.model
    if m.parametrization != "sp" and m.init_from:
        raise ConfigError(
            "model.parametrization='mup' builds a fresh μP init; it does not apply to the pretrained weights of "
            "model.init_from (use parametrization='sp')"
        )
    field = "model.hf_config" if m.hf_config else "model.init_from"
    if m.attn_scale != "sqrt":
        raise ConfigError(
            f"model.attn_scale={m.attn_scale!r} sets the reference model's attention scale; a {field} model keeps "
            "its own, and model.parametrization='mup' sets μP's from the base head size (leave attn_scale='sqrt')"
        )
    config = load_hf_config(m.hf_config or m.init_from, field)
    _check_causal_lm(config, field)
    _apply_size_overrides(cfg, config, field)
    if config.vocab_size != vocab_size:
        if m.init_from and config.vocab_size < vocab_size:
            raise ConfigError(
                f"model.init_from: {m.init_from} has vocab_size {config.vocab_size} but the data's "
                f"tokenizer has {vocab_size} tokens; use the model's own tokenizer "
                f"(data.tokenizer={m.init_from})"
            )
        if not m.init_from:
            warnings.warn(
                f"{field}: vocab_size {config.vocab_size} of {m.hf_config} replaced by the data "
                f"tokenizer's {vocab_size}",
                stacklevel=2,
            )
            config.vocab_size = vocab_size
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids of another tokenizer's vocabulary
        v = getattr(config, key, None)
        if isinstance(v, int) and not 0 <= v < config.vocab_size:
            setattr(config, key, None)
    n_pos = max_positions(config)
    if n_pos is not None and cfg.data.seq_len > n_pos:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds the model's {n_pos} positions ({field})")
    config.use_cache = False
    return config


#: model.<field> -> the HF config attribute it sets (transformers' attribute_map turns these into n_embd, ...)
SIZE_FIELDS = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}


def _apply_size_overrides(cfg: Config, config, field: str) -> None:
    """``model.hidden_size`` & co. (nonzero) resize the HF config — what ``layerwise sweep --widths`` sets.
    ``head_dim`` follows ``hidden_size / num_heads`` when the config has one."""
    m = cfg.model
    given = {k: getattr(m, k) for k in SIZE_FIELDS if getattr(m, k)}
    if not given:
        return
    if m.init_from:
        raise ConfigError(f"model.{', model.'.join(given)}: cannot resize the pretrained model of model.init_from")
    for k, v in given.items():
        attr = SIZE_FIELDS[k]
        if attr == "intermediate_size" and not hasattr(config, attr) and hasattr(config, "n_inner"):
            attr = "n_inner"  # GPT-2
        if not hasattr(config, attr):
            raise ConfigError(f"model.{k}: {type(config).__name__} ({field}) has no {attr!r} to set")
        setattr(config, attr, v)
    if (
        ("hidden_size" in given or "num_heads" in given)
        and _stored_int(config, "head_dim") is not None  # not a derived property (Falcon)
        and _stored_int(config, "num_attention_heads") is not None  # an attention head size (not Mamba2's SSM)
    ):
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={config.hidden_size} is not divisible by the "
                f"{config.num_attention_heads} attention heads"
            )
        config.head_dim = config.hidden_size // config.num_attention_heads


#: HF config fields of inner widths that the μP base scales in proportion to the hidden size (FFN, MoE
#: experts, Falcon-H1's SSM width)
INNER_WIDTH_FIELDS = (
    "intermediate_size",
    "n_inner",
    "ffn_dim",
    "ffn_hidden_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "mamba_d_ssm",
)
#: head counts (attention, key/value, SSM heads) and the head sizes stored beside them
HEAD_COUNT_FIELDS = ("num_attention_heads", "num_key_value_heads", "num_heads", "mamba_n_heads")
HEAD_SIZE_FIELDS = ("head_dim", "mamba_d_head")


def _stored_int(config, attr: str) -> int | None:
    """``config.attr`` when it is a stored integer field (not a derived property such as Falcon's head_dim)."""
    stored = getattr(config, "attribute_map", {}).get(attr, attr)  # GPT-2: num_attention_heads is n_head
    v = vars(config).get(stored)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def base_hf_config(cfg: Config, config):
    """The μP base of an HF config: ``model.base_hidden_size`` (a negative value divides the hidden size, as
    for the reference model) and every inner width of :data:`INNER_WIDTH_FIELDS` in proportion; the head
    size kept where every head count of :data:`HEAD_COUNT_FIELDS` scales evenly (heads in proportion), else
    the same heads with smaller stored head sizes (:data:`HEAD_SIZE_FIELDS`; ``ConfigError`` when they do not
    divide).  Fields a config derives (Falcon's ``head_dim``, GPT-2's head size) follow by themselves."""
    from layerwise.lab.methods import resolve_relative_widths

    hidden = int(config.hidden_size)
    resolve_relative_widths(cfg, hidden)
    base = cfg.model.base_hidden_size or hidden
    out = copy.deepcopy(config)
    out.hidden_size = base

    def scaled(attr: str, v: int) -> int:
        if (v * base) % hidden:
            raise ConfigError(
                f"model.base_hidden_size={base}: {type(config).__name__}.{attr}={v} does not scale to a whole "
                f"number at hidden size {base} (from {hidden}); choose a base that divides it"
            )
        return v * base // hidden

    for attr in INNER_WIDTH_FIELDS:
        if (v := _stored_int(config, attr)) is not None:
            setattr(out, attr, max(1, round(v * base / hidden)))
    counts = {a: v for a in HEAD_COUNT_FIELDS if (v := _stored_int(config, a)) is not None}
    if counts and all((v * base) % hidden == 0 and v * base >= hidden for v in counts.values()):
        for a, v in counts.items():  # every head count in proportion: the head sizes are kept
            setattr(out, a, v * base // hidden)
    else:  # the same heads, each smaller
        for a in HEAD_SIZE_FIELDS:
            if (v := _stored_int(config, a)) is not None:
                setattr(out, a, scaled(a, v))
    return out


def apply_mup(cfg: Config, model: nn.Module, config, init: str = "constant") -> None:
    """μP on an HF model built from ``config``, in place (see the module docstring); ``init="keep"`` for a
    model about to load trained weights (:func:`layerwise.lab.export.load_run_model`)."""
    from layerwise.scaling import WidthScaling

    tr = _transformers()
    with torch.device("meta"):
        base = tr.AutoModelForCausalLM.from_config(base_hf_config(cfg, config), dtype=torch.float32)
    try:
        rule = WidthScaling.from_models(
            model, base=base, lr_exponent=cfg.optim.lr_exponent, wd_exponent=cfg.optim.wd_exponent
        )
        rule.apply_(model, init=init)
    except ValueError as e:  # named tensors; the lab's μP always uses the 1/m readout multiplier
        raise ConfigError(
            f"model.parametrization='mup' (model.base_hidden_size={cfg.model.base_hidden_size}) does not fit "
            f"this {type(model).__name__}: {e} (the harness's μP attaches the readout multiplier; for "
            "readout='lr' use the library's WidthScaling.from_models directly)"
        ) from None


def build_hf_model(cfg: Config, vocab_size: int) -> tuple[nn.Module, Any]:
    """(trainer-ready HF model in float32, its config).  Call under the run's ``torch.manual_seed``.

    Under ``model.parametrization = "mup"`` the model is made μP (:func:`apply_mup`); the config returned is
    the one before μP (what the run records), the model's own ``config`` the one it runs with."""
    tr = _transformers()
    config = resolve_hf_config(cfg, vocab_size)
    if cfg.model.init_from:
        src = Path(cfg.model.init_from).expanduser()
        if not src.is_dir():
            raise ConfigError(f"model.init_from: {src} is not a model folder")
        try:
            model = tr.AutoModelForCausalLM.from_pretrained(
                str(src), config=config, dtype=torch.float32, local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.init_from: cannot load weights from {src} ({e})") from e
    else:
        model = tr.AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)
        if cfg.model.parametrization == "mup":
            apply_mup(cfg, model, config)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:  # pragma: no cover - guarded above
        raise ConfigError(f"the model's embedding has fewer rows than the tokenizer's {vocab_size} tokens")
    model.train()
    return as_trainer_lm(model), config


# ---------------------------------------------------------------------------------------- forward adapter
_ADAPTED: dict[type[nn.Module], type[nn.Module]] = {}


def _adapted_class(cls: type[nn.Module]) -> type[nn.Module]:
    import torch.nn.functional as F

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = cls.forward(self, input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    return type(
        cls.__name__,
        (cls,),
        {
            "forward": forward,
            "_layerwise_adapted": True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )


def as_trainer_lm(model: nn.Module) -> nn.Module:
    """Give an HF causal LM the trainer's forward contract, in place (the instance's class becomes a subclass
    of its own class, with the same name, so ``save_pretrained`` and ``isinstance`` are unchanged)."""
    cls = type(model)
    if getattr(cls, "_layerwise_adapted", False):
        return model
    if cls not in _ADAPTED:
        _ADAPTED[cls] = _adapted_class(cls)
    model.__class__ = _ADAPTED[cls]
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: the reference model's ``layers``, else the modules of an
    HF model's ``_no_split_modules`` classes (its decoder layers)."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise ConfigError(
            f"{type(model).__name__}: cannot find its decoder layers to shard (no 'layers' list and "
            f"no modules of its _no_split_modules {sorted(names)})"
        )
    return found


def write_run_config(config, run_dir: Path) -> None:
    """The resolved HF config, for resume and export (``RUN_DIR/hf_config.json``)."""
    from layerwise.lab.data import _atomic_write_bytes

    _atomic_write_bytes(run_dir / HF_CONFIG_NAME, config.to_json_string(use_diff=False).encode())


def run_hf_config(run_dir: Path):
    """The HF config a run was trained with, or None for a reference-model run."""
    p = Path(run_dir) / HF_CONFIG_NAME
    if not p.exists():
        return None
    tr = _transformers()
    return tr.AutoConfig.from_pretrained(str(p), local_files_only=True)
