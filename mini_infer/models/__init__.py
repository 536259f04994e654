"""Model registry: config.json's `architectures` picks the class."""

from torch import nn
from transformers import PretrainedConfig

from mini_infer.kernels import KernelOps
from mini_infer.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from mini_infer.models.llama import LlamaForCausalLM, MistralForCausalLM
from mini_infer.models.mixtral import MixtralForCausalLM
from mini_infer.models.qwen2 import Qwen2ForCausalLM
from mini_infer.models.qwen2_moe import Qwen2MoeForCausalLM
from mini_infer.models.qwen3 import Qwen3ForCausalLM
from mini_infer.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def get_model_class(config: PretrainedConfig) -> type[nn.Module]:
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"model architecture {architectures or '(none given)'} is not supported; "
        f"supported architectures: {sorted(MODEL_REGISTRY)}"
    )


def build_model(config: PretrainedConfig, ops: KernelOps) -> nn.Module:
    return get_model_class(config)(config, ops)
