"""A run leaves the harness: ``layerwise export RUN_DIR OUT_DIR`` and ``layerwise generate``.

:func:`export_run` writes a Hugging Face model folder — ``config.json``, ``generation_config.json``,
``model.safetensors``, the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, loadable by
``AutoTokenizer`` / ``PreTrainedTokenizerFast``) and ``layerwise_export.json`` (where it came from) — that
``AutoModelForCausalLM.from_pretrained`` loads as a *plain* model whose logits equal the run's:

* learnable multipliers are merged into their weights (:func:`layerwise.merge_multipliers`);
* a reference-model run becomes a ``LlamaForCausalLM`` (same parameter names under ``model.``); its μP
  readout multiplier ``1/m`` is folded into ``lm_head.weight`` and a μP attention scale ``1/head_dim`` into
  ``q_proj.weight`` (×``1/sqrt(head_dim)``: HF Llama scales by ``1/sqrt(head_dim)``), both exact up to float
  rounding;
* an HF-model run (``model.hf_config`` / ``model.init_from``) is saved in its own architecture and config;
  under μP (``model.parametrization = "mup"``) the readout multiplier and attention scale that
  :meth:`layerwise.WidthScaling.apply_` attached are folded into the head and query weights
  (:meth:`~layerwise.WidthScaling.fold_`; a tied head or a fused qkv whose head size grew is an error), and a
  config-held multiplier (Falcon-H1's ``lm_head_multiplier``) is saved in the config.

The weights are the run's last checkpoint (``checkpoints/last.pt``, or the sharded ``last.dcp/`` of an FSDP
run).  The folder is written under a temporary name and renamed, so an interrupted export leaves nothing that
looks complete; an existing export at ``OUT_DIR`` is replaced, any other non-empty folder is an error.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from layerwise.lab.model import LlamaModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

TOKENIZER_INFO = "tokenizer_info.json"
EXPORT_INFO = "layerwise_export.json"


class ExportError(ValueError):
    """A run directory cannot be exported; the message says why."""


# ------------------------------------------------------------------------------------------- tokenizer
def stash_tokenizer(data, run_dir: Path) -> None:
    """Copy the data's tokenizer into the run directory (``tokenizer.json`` + ``tokenizer_info.json``), so the
    run can be exported even after the data cache is gone."""
    from layerwise.lab.data import EOT, _atomic_write_bytes

    src = Path(data.dir) / "tokenizer.json"
    if not src.exists():
        return
    _atomic_write_bytes(run_dir / "tokenizer.json", src.read_bytes())
    meta = getattr(data, "meta", {}) or {}
    info = {
        "eos_token": meta.get("eos_token", EOT),
        "bos_token": meta.get("bos_token"),
        "tokenizer_source": meta.get("tokenizer_source", "train"),
        "vocab_size": int(data.vocab_size),
    }
    _atomic_write_bytes(run_dir / TOKENIZER_INFO, json.dumps(info, indent=1).encode())


def _run_tokenizer_files(run_dir: Path) -> tuple[Path, dict]:
    tok = run_dir / "tokenizer.json"
    info_path = run_dir / TOKENIZER_INFO
    if tok.exists():
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        return tok, info
    summary = run_dir / "summary.json"  # an older run: its data cache entry
    if summary.exists():
        data_dir = json.loads(summary.read_text()).get("data_dir")
        if data_dir and (Path(data_dir) / "tokenizer.json").exists():
            meta_p = Path(data_dir) / "meta.json"
            meta = json.loads(meta_p.read_text()) if meta_p.exists() else {}
            return Path(data_dir) / "tokenizer.json", {
                k: meta.get(k) for k in ("eos_token", "bos_token", "tokenizer_source")
            }
    raise ExportError(
        f"{run_dir}: no tokenizer.json in the run directory (nor in the data cache named by its "
        "summary.json); prepare the data again and re-run, or copy the tokenizer.json in"
    )


def _save_tokenizer(run_dir: Path, out: Path) -> Any:
    """Write the tokenizer files into ``out``; returns the loaded transformers tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from layerwise.lab.data import EOT

    tok_file, info = _run_tokenizer_files(run_dir)
    source = info.get("tokenizer_source") or "train"
    hf_dir = Path(source)
    if source != "train" and hf_dir.is_dir() and (hf_dir / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)  # keeps chat template & co.
    else:
        eos = info.get("eos_token") or EOT
        kw = {"eos_token": eos}
        if info.get("bos_token"):
            kw["bos_token"] = info["bos_token"]
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), **kw)
    tok.save_pretrained(str(out))
    return tok


# ------------------------------------------------------------------------------------------- the model
def _load_state(run_dir: Path) -> dict:
    from layerwise.lab import distributed as D
    from layerwise.lab.train import load_checkpoint

    last = run_dir / "checkpoints" / "last.pt"
    if last.exists():
        ckpt = load_checkpoint(last)
        return {"model": ckpt["model"], "step": ckpt.get("step"), "model_config": ckpt.get("model_config")}
    dcp_dir = D.sharded_checkpoint(run_dir / "checkpoints" / "last.dcp")
    if dcp_dir is not None:
        extra = load_checkpoint(dcp_dir / "extra.pt")
        return {
            "model": D.load_sharded_model_state(dcp_dir),
            "step": extra.get("step"),
            "model_config": extra.get("model_config"),
        }
    raise ExportError(
        f"{run_dir}: no checkpoint (checkpoints/last.pt or checkpoints/last.dcp/); has it trained "
        "past its first evaluation?"
    )


def load_run_model(run_dir: str | Path) -> tuple[nn.Module, Any, dict]:
    """(the run's model as trained — multipliers unmerged, trainer forward ``model(idx) -> logits`` —, its
    :class:`~layerwise.lab.config.Config`, checkpoint info ``{"step", "model_config"}``), in eval mode, CPU."""
    from layerwise.lab import methods
    from layerwise.lab.hf_models import apply_mup, as_trainer_lm, run_hf_config
    from layerwise.lab.model import ModelConfig
    from layerwise.lab.train import run_config

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    state = _load_state(run_dir)
    hf_config = run_hf_config(run_dir)
    if hf_config is not None:
        from transformers import AutoModelForCausalLM

        model = as_trainer_lm(AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), dtype=torch.float32))
        if cfg.model.parametrization == "mup":
            apply_mup(cfg, model, hf_config, init="keep")  # hooks and scales; the weights come next
    else:
        if not state["model_config"]:
            raise ExportError(f"{run_dir}: the checkpoint records no model_config")
        model = LlamaModel(ModelConfig(**state["model_config"]))
    methods.transform_model(model, cfg)
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state["model"].items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("rope_cos", "rope_sin"))]
    if missing or unexpected:
        raise ExportError(
            f"{run_dir}: checkpoint does not fit the run's model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.eval()
    return model, cfg, {"step": state["step"], "model_config": state["model_config"]}


def _reference_to_llama(model: LlamaModel):
    """(LlamaConfig, state dict) of a merged reference :class:`~layerwise.lab.model.LlamaModel`."""
    from transformers import LlamaConfig

    c = model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_theta)},
        hidden_act="silu",
        initializer_range=c.init_std,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    sd: dict[str, torch.Tensor] = {}
    q_scale = (c.head_dim**-0.5) if c.attn_scale == "mup" else 1.0  # 1/d = (1/sqrt d) * (1/sqrt d)
    for k, v in model.state_dict().items():
        if k in ("rope_cos", "rope_sin"):
            continue
        v = v.detach().to(torch.float32).clone()
        if k == "lm_head.weight" and model.readout_mult != 1.0:
            v = v * model.readout_mult
        if k.endswith("self_attn.q_proj.weight") and q_scale != 1.0:
            v = v * q_scale
        sd[k if k == "lm_head.weight" else f"model.{k}"] = v
    return config, sd


def _check_ties(model: PreTrainedModel, config) -> None:
    """``model``: the run's model after merging (a tied pair a multiplier was on is no longer one tensor)."""
    if not getattr(config, "tie_word_embeddings", False):
        return
    emb, head = _weight(model.get_input_embeddings()), _weight(model.get_output_embeddings())
    if emb is not None and head is not None and head is not emb and not torch.equal(head, emb):
        raise ExportError(
            "the model ties its input and output embeddings (tie_word_embeddings=true) but they "
            "differ after merging multipliers; a plain model would re-tie them on load. Train with "
            "tie_word_embeddings=false or a multiplier placement that skips the embedding"
        )


def _plain_model(run_dir: Path):
    """(plain HF model with merged weights, its config, cfg, info)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

    from layerwise.multipliers import merge_multipliers
    from layerwise.scaling.model_side import applied

    model, cfg, info = load_run_model(run_dir)
    probe = torch.randint(0, _vocab(model), (1, min(16, cfg.data.seq_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(probe).double()
    merge_multipliers(model)
    if isinstance(model, LlamaModel):  # the reference model: a run without hf_config.json
        config, sd = _reference_to_llama(model)
        plain = LlamaForCausalLM(config)
    elif isinstance(model, PreTrainedModel):  # an HF-model run
        mup = applied(model)
        if mup is not None:  # μP readout multiplier and attention scale into the weights (config-held ones stay)
            try:
                mup.rule.fold_(model)
            except ValueError as e:
                raise ExportError(f"{run_dir}: {e}") from None
        # the model's own config: apply_ may have set a config-held multiplier (Falcon-H1's lm_head_multiplier)
        config = copy.deepcopy(model.config)
        _check_ties(model, config)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        raise ExportError(f"{run_dir}: cannot export a {type(model).__name__} (neither the reference nor an HF model)")
    plain.load_state_dict(sd, strict=True)
    plain.eval()
    with torch.no_grad():
        got = plain(probe).logits.double()
    err = (got - ref).abs().max().item()
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    if not err <= tol:  # a method whose merge is not exact for this architecture: never write a wrong model
        raise ExportError(
            f"{run_dir}: the merged plain model's logits differ from the run's by {err:.3g} "
            f"(tolerance {tol:.3g}) on a probe batch; not exporting"
        )
    info = {**info, "probe_max_abs_logit_diff": err}
    return plain, config, cfg, info


def _weight(module: nn.Module | None) -> torch.Tensor | None:
    """``module.weight`` of an embedding or LM head (None without a module or a tensor weight)."""
    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _vocab(model: nn.Module) -> int:
    """Vocabulary size of a run's model: the reference model's config, else the HF model's input embedding."""
    from transformers import PreTrainedModel

    if isinstance(model, LlamaModel):
        return model.config.vocab_size
    emb = _weight(model.get_input_embeddings()) if isinstance(model, PreTrainedModel) else None
    if emb is None:
        raise ExportError(f"{type(model).__name__}: cannot find its input embedding to read the vocabulary size")
    return int(emb.shape[0])


def _prepare_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_INFO).exists())):
        raise ExportError(
            f"{out} exists and is not an earlier export (no {EXPORT_INFO}); choose an empty or new folder"
        )


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the run in ``run_dir`` to a Hugging Face folder ``out_dir`` (see the module docstring); returns
    ``out_dir`` as a ``Path``."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - transformers is in the [hf] extra
        raise ExportError("export needs the 'transformers' package: pip install 'layerwise[hf]'") from e
    run_dir, out = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.toml").exists():
        raise ExportError(f"{run_dir} is not a run directory (no config.toml)")
    _prepare_out(out)
    plain, config, cfg, info = _plain_model(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        tok = _save_tokenizer(run_dir, tmp)
        special = {"eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id}
        for k, v in special.items():
            if v is not None:
                setattr(plain.config, k, v)
        if plain.generation_config is not None:
            for k, v in special.items():
                if v is not None:
                    setattr(plain.generation_config, k, v)
            if tok.pad_token_id is None and tok.eos_token_id is not None:
                plain.generation_config.pad_token_id = tok.eos_token_id
        plain.config.use_cache = True
        plain.save_pretrained(str(tmp), safe_serialization=True)
        record = {
            "run_dir": str(run_dir.resolve()),
            "step": info.get("step"),
            "probe_max_abs_logit_diff": info["probe_max_abs_logit_diff"],
            "architecture": type(plain).__name__,
            "multipliers_merged": cfg.multipliers.kind != "none",
            "multipliers": cfg.multipliers.kind,
            "optimizer": cfg.optim.name,
            "decay": cfg.decay.name,
            "parametrization": cfg.model.parametrization,
            "seed": cfg.train.seed,
        }
        if cfg.model.parametrization == "mup":
            record["folded"] = "muP readout multiplier in the head weight; attention scale in the query projection" + (
                "; config-held multipliers in config.json" if cfg.model.hf_config else ""
            )
        (tmp / EXPORT_INFO).write_text(json.dumps(record, indent=1))
        from layerwise.lab.data import replace_dir

        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------- sampling
def generate(
    source: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
) -> str:
    """Sample a continuation of ``prompt`` from a run directory (exported on the fly) or an HF model folder;
    returns the decoded text (prompt included).  ``temperature = 0`` decodes greedily."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(source)
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    with tempfile.TemporaryDirectory() as tmp:
        if (src / "config.toml").exists():
            model_dir = export_run(src, Path(tmp) / "model")
        elif (src / "config.json").exists():
            model_dir = src
        else:
            raise ExportError(
                f"{src} is neither a run directory (config.toml) nor a Hugging Face model folder (config.json)"
            )
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise ValueError("--prompt is empty after tokenization")
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
    if temperature > 0:
        kw.update(temperature=temperature, top_k=top_k)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kw)
    text = tok.decode(out[0], skip_special_tokens=False)
    assert isinstance(text, str)  # one sequence decodes to one string (a batch would give a list)
    return text


# ------------------------------------------------------------------------------------------------- CLI
def _cmd_export(args: argparse.Namespace) -> int:
    out = export_run(args.run_dir, args.out_dir)
    print(f"exported {args.run_dir} -> {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    print(
        generate(
            args.source,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a run as a Hugging Face model folder (multipliers merged)")
    p.add_argument("run_dir", help="a run directory (config.toml + checkpoints/)")
    p.add_argument("out_dir", help="the folder to write (config.json, model.safetensors, tokenizer files)")
    p.set_defaults(func=_cmd_export)
    p = subparsers.add_parser("generate", help="sample text from a run directory or a Hugging Face model folder")
    p.add_argument("source", metavar="RUN_DIR|HF_DIR", help="a run directory or a Hugging Face model folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to sample (default 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8; 0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (default 50)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    p.set_defaults(func=_cmd_generate)
