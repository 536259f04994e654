"""Reading a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`) into host tensors, and
refusing, at load, what the engine cannot apply.

PEFT names each weight after the module it adapts, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). The module is looked up in the model's targets (manager.py): q_proj lands in the fused
qkv_proj's first slice, up_proj in gate_up_proj's second. The scaling (`lora_alpha / r`, or
`lora_alpha / sqrt(r)` with rsLoRA; per module with `rank_pattern` / `alpha_pattern`) is folded into B.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from mini_infer.lora.request import LoRARequest

SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class Target:
    """Where one checkpoint module's adapter goes: our projection, its slice, the slice's shape."""

    module: str  # our module's name, e.g. model.layers.0.self_attn.qkv_proj
    slice: int  # which of its output slices (q, k, v or gate, up; 0 for an unfused projection)
    in_features: int
    out_features: int  # the slice's


@dataclass
class LoRAAdapter:
    """An adapter's weights on the host, per our module: (slice, A [r, in], B * scaling [out, r])."""

    request: LoRARequest
    rank: int
    weights: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name's tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"LoRA adapter {str(path)!r} has no adapter_config.json (a PEFT LoRA folder is needed)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {str(path)!r}: peft_type {config['peft_type']!r} is not LORA")
    refused = {
        "use_dora": "DoRA adapters are not supported",
        "lora_bias": "lora_bias (a bias on B) is not supported",
        "layer_replication": "layer_replication is not supported",
        "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
        "target_parameters": "target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
        "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
        "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layout) is not supported",
    }
    for key, why in refused.items():
        if config.get(key):
            raise ValueError(f"LoRA adapter {str(path)!r}: {why}")
    if config.get("bias", "none") != "none":
        raise ValueError(f"LoRA adapter {str(path)!r}: bias={config['bias']!r} is not supported (only 'none')")
    return config


def load_adapter(
    request: LoRARequest, targets: dict[str, Target], max_lora_rank: int, dtype: torch.dtype
) -> LoRAAdapter:
    """The adapter of `request`, checked against the model's targets and max_lora_rank (ValueError if
    the folder is missing or malformed, its rank too large, or it adapts a module we cannot apply)."""
    path = Path(request.lora_path).expanduser()
    if not path.is_dir():
        raise ValueError(f"LoRA adapter path {request.lora_path!r} is not a folder")
    config = _read_config(path)
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ValueError(f"LoRA adapter {request.lora_path!r} has no adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(
                f"LoRA adapter {request.lora_path!r}: weight {key!r} is not a LoRA A/B matrix of a linear layer "
                f"(supported targets: {', '.join(SUPPORTED_MODULES)})"
            )
        pairs.setdefault(match["module"], {})[match["ab"]] = tensor
    if not pairs:
        raise ValueError(f"LoRA adapter {request.lora_path!r} holds no LoRA weights")
    alpha, default_rank = config.get("lora_alpha", 8), config.get("r", 8)
    adapter = LoRAAdapter(request, rank=0)
    for name, ab in sorted(pairs.items()):
        target = targets.get(name)
        if target is None:
            leaf = name.rsplit(".", 1)[-1]
            why = "not in this model" if leaf in SUPPORTED_MODULES else f"supported: {', '.join(SUPPORTED_MODULES)}"
            raise ValueError(f"LoRA adapter {request.lora_path!r}: cannot apply to module {name!r} ({why})")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {request.lora_path!r}: module {name!r} lacks its lora_A or lora_B")
        a, b = ab["A"].float(), ab["B"].float()
        rank = a.shape[0]
        if a.shape != (rank, target.in_features) or b.shape != (target.out_features, rank):
            raise ValueError(
                f"LoRA adapter {request.lora_path!r}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}; this "
                f"model needs ({rank}, {target.in_features}) and ({target.out_features}, {rank})"
            )
        if rank > max_lora_rank:
            raise ValueError(f"LoRA adapter {request.lora_path!r} has rank {rank}, above max_lora_rank={max_lora_rank}")
        module_alpha = _pattern_value(config.get("alpha_pattern"), name, alpha)
        if rank != _pattern_value(config.get("rank_pattern"), name, default_rank):
            raise ValueError(f"LoRA adapter {request.lora_path!r}: {name} has rank {rank}, not its config's")
        scaling = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        adapter.weights.setdefault(target.module, []).append((target.slice, a.to(dtype), (b * scaling).to(dtype)))
        adapter.rank = max(adapter.rank, rank)
    return adapter
