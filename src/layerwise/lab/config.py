"""Typed run configuration: dataclass sections, TOML in and out, ``section.key=value`` overrides, presets.

Every hyper-parameter of a run is visible here, in one place.  Unknown sections or keys and values of the
wrong type are errors that name the key; the resolved config is written to ``RUN_DIR/config.toml``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A config file, override or preset is invalid; the message names the key."""


@dataclass
class ModelSection:
    size: str = "tiny"  # a name from layerwise.lab.model.SIZES; the fields below override it when nonzero
    hidden_size: int = 0
    intermediate_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0
    init_std: float = 0.02
    parametrization: str = "sp"  # "sp" | "mup" (see layerwise.scaling)
    base_hidden_size: int = 0  # muP base width (0 = this model's width)
    attn_scale: str = "sqrt"  # "sqrt" | "mup" (1/head_dim)
    # Any Hugging Face causal LM (see layerwise.lab.hf_models): a config.json or a model folder, built with
    # AutoModelForCausalLM.from_config (the size fields above are then unused); init_from = a model folder
    # whose weights the run starts from (continued pre-training / fine-tuning).
    hf_config: str = ""
    init_from: str = ""


@dataclass
class DataSection:
    # "shakespeare"; a text file, folder, .jsonl/.json/.parquet/.arrow/.csv file or folder; or hf:NAME[:CONFIG]
    # (see layerwise.lab.sources)
    corpus: str = "shakespeare"
    valid: str = ""  # optional validation file/folder, or an hf: split name (else the corpus's own split)
    vocab_size: int = 8192  # size of the trained BPE (data.tokenizer = "train"); a pretrained one has its own
    seq_len: int = 128
    text_field: str = "text"  # the text column of record sources
    tokenizer: str = "train"  # "train" (our byte-level BPE) or a tokenizer.json / HF tokenizer folder
    eos_token: str = ""  # end-of-document token ("" = from the tokenizer's special tokens)
    max_tokens: int = 0  # > 0: tokenize at most this many training tokens
    max_valid_tokens: int = 0  # > 0: at most this many validation tokens
    num_proc: int = 0  # tokenizer worker processes (0 = every core; one for local corpora under 8 MB)


@dataclass
class OptimSection:
    name: str = "adamw"  # a name of layerwise.optim.registry: adamw | adam (coupled L2) | alphaadam | cautious | muon
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | wsd | linear | constant (see layerwise.schedules)
    warmup_frac: float = 0.1  # linear warm-up over this fraction of max_steps
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    decay_frac: float = 0.2  # wsd: the final fraction of max_steps that cools down
    decay_shape: str = "linear"  # wsd cool-down: linear | sqrt (1 - sqrt)
    grad_clip: float = 1.0  # 0 = no clipping
    fused: bool = True  # torch's fused AdamW/Adam where available
    # parameter groups
    multiplier_weight_decay: float = 2e-3
    multiplier_lr_scale: float = 1.0
    # width scaling (used when model.parametrization = "mup")
    lr_exponent: float = 1.0
    wd_exponent: float = 0.5  # 0.5 = Fan et al. (sqrt d); 1.0 = mup MuAdamW (lr*wd const); 0.0 = plain muP
    # AlphaAdam / CautiousAdamW
    mask_ref: str = "previous"
    alpha_mode: str = "norm"
    alpha_max: float = 10.0
    floor: float = 0.0
    alpha_lag: int = 0  # 1: alpha (cautious: its scale) from the previous step's statistics, in one pass
    # Muon (2-D block matrices; the rest uses AdamW with lr above).  Muon's update is rescaled to AdamW's
    # RMS ("match_rms_adamw"), so AdamW's lr and weight decay carry over: muon_lr 0 = optim.lr.
    muon_lr: float = 0.0
    muon_momentum: float = 0.95


@dataclass
class DecaySection:
    name: str = "none"  # none | uniform | alphadecay | awd | adadecay | typedecay
    interval: int = 500
    s1: float = 0.6666
    s2: float = 3.0
    estimator: str = "hill"
    preserve_mean: bool = False
    ema: float = 0.0  # 0 = no EMA of alpha
    shape_correction: bool = False
    # alphadecay: which modules / which score / which map (docs/methods.md §1: differences from the authors)
    modules: str = "blocks"  # blocks (every block matrix) | authors (every nn.Linear but the first and last)
    metric: str = "alpha"  # alpha | alphahat | spectral_norm | stable_rank | entropy
    assign: str = "linear"  # linear | sqrt | log2 | sigmoid
    timing: str = "after"  # after (recompute after every interval-th step) | before (the authors' loop)
    slope: float = 4.0  # sigmoid slope: assign="sigmoid" and adadecay (the authors: 4)
    # adadecay (interval above): the authors' baseline is norm="raw", slope 4, every 500 steps
    adadecay_norm: str = "raw"  # raw (‖g‖) | rms (‖g‖/sqrt(numel))
    # awd: "calibrate" (λ_awd set so the first step's decay is optim.weight_decay) | "authors" (100 x wd0) |
    # a number in quotes, e.g. decay.lambda_awd='"0.5"'
    lambda_awd: str = "calibrate"


@dataclass
class MultipliersSection:
    kind: str = "none"  # none | rowcol | row | col | scalar
    placement: str = "paper"  # paper | symmetry_free
    clip_separately: float = 0.0  # > 0: clip the multipliers' own norm to this value


@dataclass
class TrainSection:
    max_steps: int = 600
    batch_size: int = 16  # global batch (sequences per optimizer step, across grad_accum and ranks)
    grad_accum: int = 1
    seed: int = 0
    eval_every: int = 200  # 0 = only at the end
    log_every: int = 10
    ckpt_every: int = 0  # 0 = only at evaluations and at the end (independent of log_every)
    ckpt_minutes: float = 5.0  # also checkpoint (at a logging step) when this long has passed since the last
    #                            save, so a crash or kill -9 loses at most a few minutes (0 = off; one process)
    keep_checkpoints: int = 2  # the newest checkpoint and K-1 before it (a corrupt newest falls back)
    stop_at: int = 0  # > 0: checkpoint and end this invocation after this step (the schedule still runs to
    #                   max_steps; continue with --resume) — for preemptible or time-limited allocations
    device: str = "cpu"  # cpu | cuda
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (inductor; aot_eager: graph capture without codegen)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead | max-autotune | ...
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    parallel: str = "none"  # none | ddp | fsdp
    dist_timeout_s: float = 600.0  # every collective's timeout: a stalled/dead rank ends the job after this
    num_threads: int = 0  # torch intra-op threads (0 = torch default)
    tensorboard: bool = True
    progress: bool = True
    spectral_every: int = 0  # log analyze() of the block matrices every N steps (0 = off)
    diagnostics_every: int = 100  # method diagnostics (AlphaAdam mask density, multiplier norms, gains)
    export_merged: bool = True  # with multipliers: also write checkpoints/merged.pt


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    decay: DecaySection = field(default_factory=DecaySection)
    multipliers: MultipliersSection = field(default_factory=MultipliersSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def copy(self) -> Config:
        return from_dict(self.to_dict())


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {name: get_type_hints(Config)[name] for name in SECTIONS}


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float and not isinstance(value, float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def apply(cfg: Config, section: str, key: str, value: Any) -> None:
    """Set ``cfg.section.key = value`` with type checking; errors name the key."""
    if section not in _SECTION_TYPES:
        raise ConfigError(f"unknown config section {section!r} (in {section}.{key}); sections: {sorted(SECTIONS)}")
    sec_type = _SECTION_TYPES[section]
    hints = get_type_hints(sec_type)
    if key not in hints:
        raise ConfigError(f"unknown config key {section}.{key}; valid keys in [{section}]: {sorted(hints)}")
    setattr(getattr(cfg, section), key, _coerce(f"{section}.{key}", value, hints[key]))


def from_dict(d: dict, cfg: Config | None = None) -> Config:
    cfg = cfg or Config()
    for section, values in d.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section [{section}]; sections: {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        for key, value in values.items():
            apply(cfg, section, key, value)
    return cfg


def load_toml(path: str | Path, cfg: Config | None = None) -> Config:
    path = Path(path)
    from layerwise.lab.validation import check_config_file

    check_config_file(path)  # a directory / non-UTF-8 file: an error naming it
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from e
    try:
        return from_dict(data, cfg)
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"optim.lr=1e-3"`` -> ("optim", "lr", 0.001).  Values are TOML; bare words are strings."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    lhs, raw = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def apply_overrides(cfg: Config, overrides: list[str] | dict[str, Any]) -> Config:
    items = (
        overrides.items()
        if isinstance(overrides, dict)
        else [(f"{s}.{k}", v) for s, k, v in map(parse_override, overrides)]
    )
    for dotted, value in items:
        section, key = dotted.split(".", 1)
        apply(cfg, section, key, value)
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(cfg: Config) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- presets
#: what every paper-scale preset shares (the AlphaDecay authors' LLaMA-on-C4 setup, on a GPU; the c4-* presets
#: take the vocabulary from the T5 tokenizer, the llama-* ones train a 32k BPE on data.corpus)
_PAPER: dict[str, Any] = {
    "data.seq_len": 256,
    "train.batch_size": 512,
    "optim.lr": 1e-3,
    "optim.warmup_frac": 0.1,
    "optim.min_lr_ratio": 0.1,
    "optim.grad_clip": 0.0,
    "train.eval_every": 1000,
    "train.device": "cuda",
    "decay.interval": 500,
}
#: per model size: gradient accumulation (batch 512 either way) and schedule length
_PAPER_SIZES: dict[str, dict[str, Any]] = {
    "llama-60m": {"model.size": "llama-60m", "train.grad_accum": 4, "train.max_steps": 10000},
    "llama-135m": {"model.size": "llama-135m", "train.grad_accum": 8, "train.max_steps": 20000},
}
#: per optimizer, as in the authors' scripts: AdamW (wd0 0.1, s2 = 5) and Adam with coupled L2 (wd0 1e-5, s2 = 3)
_PAPER_ADAMW = {"optim.name": "adamw", "optim.weight_decay": 0.1, "decay.s1": 0.6666, "decay.s2": 5.0}
_PAPER_ADAM = {"optim.name": "adam", "optim.weight_decay": 1e-5, "decay.s1": 0.6666, "decay.s2": 3.0}

PRESETS: dict[str, dict[str, Any]] = {
    # The demo: the tiny model (1.8M parameters with a 4096-token BPE) on Shakespeare, 450k training tokens,
    # about 1.5 minutes on a 2-core CPU.  AlphaDecay recomputes every 25 of the 220 steps (the paper: every
    # 500 of 10k-20k steps).
    "quick": {
        "model.size": "tiny",
        "data.corpus": "shakespeare",
        "data.vocab_size": 4096,
        "data.seq_len": 128,
        "train.max_steps": 220,
        "train.batch_size": 16,
        "train.eval_every": 110,
        "optim.lr": 3e-3,
        "optim.weight_decay": 0.1,
        "train.num_threads": 2,
        "decay.interval": 25,
    },
    # Unit-test scale: seconds.
    "smoke": {
        "model.size": "nano",
        "data.vocab_size": 512,
        "data.seq_len": 32,
        "train.max_steps": 20,
        "train.batch_size": 4,
        "train.eval_every": 10,
        "train.log_every": 5,
    },
    # The AlphaDecay paper's recipe (LLaMA on C4, 256-token sequences, batch 512, lr 1e-3, cosine with 10 %
    # warm-up to 0.1x, no clipping) for GPU users: point data.corpus at your corpus.  Per optimizer as in the
    # authors' scripts (docs/methods.md §1): AdamW with wd0 0.1 and s2 = 5 (llama-60m, llama-135m); torch Adam
    # with coupled L2, wd0 1e-5 and s2 = 3 (the -adam variants, the paper's main table).  The decay method
    # itself comes from the method (compare) or decay.name=...; decay.modules=authors decay.timing=before
    # gives the authors' module set and loop.
    **{
        size + suffix: {**_PAPER, **_PAPER_SIZES[size], "data.vocab_size": 32000, **optim}
        for size in _PAPER_SIZES
        for suffix, optim in (("", _PAPER_ADAMW), ("-adam", _PAPER_ADAM))
    },
    # The AlphaDecay paper's recipe end to end, as a user with a GPU and a network runs it: C4 (English) streamed
    # from the hub, the T5 tokenizer (32k; by hub id, or point data.tokenizer at a local copy), LLaMA-60M /
    # 135M, 256-token sequences, batch 512, lr 1e-3, cosine with 10 % warm-up to 0.1x.  data.max_tokens covers
    # max_steps x batch x seq_len (1.31B / 2.62B tokens); 10M tokens of C4's validation split.  Not run in tests.
    **{
        f"c4-{size.removeprefix('llama-')}": {
            **_PAPER,
            **_PAPER_SIZES[size],
            "data.corpus": "hf:allenai/c4:en",
            "data.valid": "validation",
            "data.tokenizer": "t5-base",
            "data.max_tokens": max_tokens,
            "data.max_valid_tokens": 10_000_000,
            "optim.weight_decay": 0.1,
            "optim.schedule": "cosine",
        }
        for size, max_tokens in (("llama-60m", 1_350_000_000), ("llama-135m", 2_700_000_000))
    },
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return apply_overrides(Config(), dict(PRESETS[name]))


def resolve(
    preset_name: str | None = None, config_file: str | None = None, overrides: list[str] | None = None
) -> Config:
    """Defaults <- preset <- config file <- overrides, in that order."""
    cfg = preset(preset_name) if preset_name else Config()
    if config_file:
        cfg = load_toml(config_file, cfg)
    return apply_overrides(cfg, overrides or [])
