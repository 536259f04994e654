"""Finds a model (local dir, hub id or shipped preset), reads its configs, builds it, loads weights."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from mini_infer.kernels import KernelOps
from mini_infer.models import build_model

logger = logging.getLogger(__name__)
PRESETS_DIR = Path(__file__).parent / "presets"


def preset_path(name: str) -> Path | None:
    """`Qwen/Qwen3-0.6B` or `qwen3-0.6b` -> the shipped config presets/qwen3-0.6b.json, if any."""
    candidate = PRESETS_DIR / f"{name.split('/')[-1].lower()}.json"
    return candidate if candidate.is_file() else None


def resolve_model_path(model: str) -> Path:
    """A local directory as is; a preset's JSON file; otherwise a hub id, downloaded if reachable."""
    if os.path.isdir(model):
        return Path(model)
    if preset := preset_path(model):
        return preset
    if os.path.exists(model):
        raise ValueError(f"model path {model!r} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model"]
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, no access: all end the same way for a user
        presets = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise ValueError(
            f"model {model!r} is neither a local directory, a preset ({presets}) nor a reachable hub id: {e}"
        ) from e


def load_hf_config(path: Path) -> PretrainedConfig:
    if path.is_file():  # a preset: config.json contents
        data = json.loads(path.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    if not (path / "config.json").is_file():
        raise ValueError(f"no config.json in {path}")
    return AutoConfig.from_pretrained(path)


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
    """Copies checkpoint tensors into the model through each parameter's weight_loader."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.config, "tie_word_embeddings", False)
    packed = getattr(model, "packed_modules_mapping", {})
    loaded: set[str] = set()
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                    continue
                target, shard = name, None
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
                    raise ValueError(f"checkpoint tensor {name!r} {tuple(tensor.shape)} does not fit "
                                     f"parameter {target!r} {tuple(param.shape)}: {e}") from e
                loaded.add(target)
    if tied:
        loaded.add("lm_head.weight")
    missing = sorted(n for n in params if n not in loaded)
    if missing:
        raise ValueError(f"checkpoint in {path} lacks weights for: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the right shapes: same bytes and FLOPs as the real model, no download."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            gen = torch.Generator(device=param.device).manual_seed(seed + i)
            param.data.uniform_(-0.02, 0.02, generator=gen)


def load_model(
    path: Path, config: PretrainedConfig, ops: KernelOps, dtype: torch.dtype, device: torch.device,
    load_format: str, seed: int,
) -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(config, ops)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        if path.is_file():
            raise ValueError(f"{path.name} is an architecture preset with no weights: use load_format='dummy'")
        load_weights(model, path)
    return model.eval()
