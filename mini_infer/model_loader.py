"""Finds a model (local dir, hub id or shipped preset), reads its configs, builds it, loads weights."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from mini_infer.kernels import KernelOps
from mini_infer.models import build_model

logger = logging.getLogger(__name__)
PRESETS_DIR = Path(__file__).parent / "presets"


# A hub id as the hub spells it: `org/name` (or a bare legacy `name`); anything else is a path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def preset_path(name: str) -> Path | None:
    """A shipped architecture preset, by its own bare name only: `qwen3-0.6b` -> presets/qwen3-0.6b.json.
    `Qwen/Qwen3-0.6B` is a hub id, never a preset."""
    return PRESETS_DIR / f"{name}.json" if name in preset_names() else None


def resolve_model_path(model: str, load_format: str = "auto") -> Path:
    """A local directory as is; a preset's bare name with load_format "dummy" (a preset has no weights);
    otherwise a hub id, downloaded or found in the local Hugging Face cache (HF_HUB_CACHE). Every way this
    fails is a one-line ValueError that says what to change."""
    if os.path.isdir(model):
        return Path(model)
    if os.path.exists(model):
        raise ValueError(f"model path {model!r} is a file, not a model folder")
    if preset := preset_path(model):
        if load_format != "dummy":
            raise ValueError(
                f"{model!r} is an architecture preset with no weights: add --load-format dummy to run "
                "it with random weights, or give a model folder or hub id"
            )
        return preset
    if not HUB_ID.match(model) or ".." in model:
        raise ValueError(f"model {model!r} is neither a local directory nor a hub id (org/name): no such folder")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "tokenizer*", "*.model", *(["*.safetensors"] if load_format != "dummy" else [])]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # each kind of failure in one line: what to do about it
        error = e
    if isinstance(error, GatedRepoError):
        reason = "it is gated: accept its terms on the hub and log in (`hf auth login`)"
    elif isinstance(error, RepositoryNotFoundError):
        reason = "the hub has no such repository, or it is private (log in with `hf auth login`)"
    elif isinstance(error, LocalEntryNotFoundError):
        reason = f"the hub cannot be reached and the local cache ({constants.HF_HUB_CACHE}) does not hold it"
    else:  # a network or disk error: its own message says which
        reason = " ".join(str(error).split())[:300]
    presets = f"; presets (with --load-format dummy): {', '.join(preset_names())}" if "/" not in model else ""
    raise ValueError(f"model {model!r} is not a local directory, and as a hub id: {reason}{presets}") from error


def load_hf_config(path: Path) -> PretrainedConfig:
    if path.is_file():  # a preset: config.json contents
        data = json.loads(path.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"no config.json in {path}: is it a Hugging Face model folder?")
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e}): restore the file from the model's source") from e
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:  # e.g. a model_type this transformers does not know
        raise ValueError(f"{config} could not be read by transformers: {' '.join(str(e).split())[:300]}") from e


def eos_token_ids(path: Path, config: PretrainedConfig) -> set[int]:
    """EOS ids from config.json and generation_config.json (which may hold a list)."""
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None)]
    gen_file = path / "generation_config.json" if path.is_dir() else None
    if gen_file and gen_file.is_file():
        sources.append(json.loads(gen_file.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return ids


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index.name} names weight files that are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors weight files in {path}")
    return files


def load_weights(model: nn.Module, path: Path) -> None:
    """Copies checkpoint tensors into the model through each parameter's weight_loader (and FP8 KV cache
    scales into their attention layers' buffers: quantization/kv_cache.py)."""
    from mini_infer.quantization.kv_cache import is_unused_attention_scale, kv_scale_target, load_kv_scale

    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.config, "tie_word_embeddings", False)
    packed = getattr(model, "packed_modules_mapping", {})
    remap = getattr(model, "map_checkpoint_name", None)
    skip = getattr(model, "ignore_checkpoint_name", None)
    loaded: set[str] = set()
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                    continue
                if skip is not None and skip(name):  # weights generation never uses (V3's MTP layer)
                    continue
                if kv_scale_target(name) is not None:
                    load_kv_scale(model, name, f.get_tensor(name))
                    continue
                if is_unused_attention_scale(name):
                    continue
                target, shard = name, None
                if (mapped := remap(name) if remap else None) is not None:  # e.g. experts into stacked tensors
                    target, shard = mapped
                else:
                    for ckpt_part, (our_part, shard_id) in packed.items():
                        if f".{ckpt_part}." in name:
                            target, shard = name.replace(f".{ckpt_part}.", f".{our_part}."), shard_id
                            break
                param = params.get(target)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} in {file.name} matches no model parameter")
                tensor = f.get_tensor(name)
                loader = getattr(param, "weight_loader", None)
                try:
                    if loader is None:
                        param.data.copy_(tensor)
                    else:
                        loader(param, tensor, shard)
                except RuntimeError as e:
                    raise ValueError(
                        f"checkpoint tensor {name!r} {tuple(tensor.shape)} does not fit "
                        f"parameter {target!r} {tuple(param.shape)}: {e}"
                    ) from e
                loaded.add(target)
    if tied:
        loaded.add("lm_head.weight")
    missing = sorted(n for n in params if n not in loaded)
    # parameters loaded in parts (a layer's stacked experts) say which parts never came
    missing += [
        f"{n} ({part})" for n, m in model.named_modules() if hasattr(m, "unloaded_parts") for part in m.unloaded_parts()
    ]
    if missing:
        raise ValueError(f"checkpoint in {path} lacks weights for: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the right shapes: same bytes and FLOPs as the real model, no download."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(("weight_scale", "weight_scale_inv")):  # 8-bit checkpoint layouts: |w| <= 0.02
            param.data.fill_(0.02 / 64)
        elif param.element_size() == 1:
            gen = torch.Generator(device=param.device).manual_seed(seed + i)
            values = torch.empty(param.shape, device=param.device).uniform_(-64, 64, generator=gen)
            param.data.copy_(values.round())
        else:
            gen = torch.Generator(device=param.device).manual_seed(seed + i)
            param.data.uniform_(-0.02, 0.02, generator=gen)


def load_model(
    path: Path,
    config: PretrainedConfig,
    ops: KernelOps,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    seed: int,
    quantization: str | None = None,
) -> nn.Module:
    """quantization: EngineConfig.quantization; a quantized checkpoint's own scheme is read either way."""
    from mini_infer.quantization.setup import process_weights_after_loading, quantize_model, resolve_quant_config

    quant = resolve_quant_config(quantization, config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(config, ops)
            if quant is not None:
                quantize_model(model, quant)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        if path.is_file():
            raise ValueError(f"{path.stem} is an architecture preset with no weights: add --load-format dummy")
        load_weights(model, path)
    process_weights_after_loading(model)
    return model.eval()
