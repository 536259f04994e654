"""Linear layers shaped for tensor parallelism.

Column-parallel layers split their output features across ranks, row-parallel layers their input
features (followed by an all-reduce). Each parameter carries a `weight_loader` that copies this
rank's slice of a checkpoint tensor, so models never index weights themselves. With one rank the
slices are whole tensors.

How a layer stores and multiplies its weights is its `quant_method` (a linear method, vLLM's seam):
`UnquantizedLinearMethod` keeps `weight` in the model dtype and calls the kernel set's `linear` (cuBLAS,
or a Triton GEMV for one or two rows where it wins, kernels/gemv.py); mini_infer/quantization/ holds the
8-bit ones, swapped in by `set_quant_method` before the weights load. Loaders slice any parameter whose
rows are output features (a weight, per-channel scales, per-block scales with `output_block` rows each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from mini_infer.distributed import get_tp_rank, get_tp_size
from mini_infer.distributed.communication_op import tensor_model_parallel_all_reduce
from mini_infer.kernels import TORCH_OPS, KernelOps

if TYPE_CHECKING:
    from mini_infer.kernels.act_quant import QuantizedActivation


def _divide(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not divisible by the tensor-parallel size {b}")
    return a // b


def _output_rows(param: nn.Parameter, rows: int) -> int:
    """Output features -> rows of `param` (a block-scale row covers `output_block` features)."""
    block = getattr(param, "output_block", 1)
    if rows % block:
        raise ValueError(f"{rows} output features are not a whole number of {block}-row quantization blocks")
    return rows // block


class UnquantizedLinearMethod:
    """Weights in the model dtype; the product is the kernel set's `linear`."""

    def __init__(self, linear: Callable) -> None:
        self.linear = linear

    def create_weights(self, layer: LinearBase) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features), requires_grad=False)
        layer.weight.weight_loader = layer.weight_loader

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        pass

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, ops: KernelOps) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # this rank's
        self.quant_method = UnquantizedLinearMethod(ops.linear)
        self.quant_method.create_weights(self)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def set_quant_method(self, method: object) -> None:
        """Replaces how the weight is stored (before loading): the method registers its own parameters."""
        del self.weight
        self.quant_method = method
        method.create_weights(self)

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        """x: the input, or (a method whose `input_quant_dtype` names one) the input already in 8 bits."""
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank (an MoE router: a few outputs per token, not worth splitting)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, ops: KernelOps = TORCH_OPS) -> None:
        super().__init__(in_features, out_features, bias, ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, ops: KernelOps = TORCH_OPS) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(in_features, _divide(out_features, self.tp_size), bias, ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matrix (gate and up): loaded shard by shard."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False, ops: KernelOps = TORCH_OPS) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        size = _output_rows(param, self.out_sizes[shard_id] // self.tp_size)
        offset = _output_rows(param, sum(self.out_sizes[:shard_id]) // self.tp_size)
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix; heads split across ranks (KV heads are
    replicated when there are fewer of them than ranks)."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, ops: KernelOps = TORCH_OPS
    ) -> None:
        tp = get_tp_size()
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp)
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.kv_replicas = max(1, tp // num_kv_heads)
        super().__init__(hidden, (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp, bias, ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[shard_id]
        offset, size = _output_rows(param, offset), _output_rows(param, size)
        shard = self.tp_rank if shard_id == "q" else self.tp_rank // self.kv_replicas
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, shard * size, size))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, ops: KernelOps = TORCH_OPS) -> None:
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        super().__init__(_divide(in_features, self.tp_size), out_features, bias, ops)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        cols = param.shape[1] if param.dim() > 1 else 0
        # the bias is added once, on every rank after the reduce; per-channel scales [out, 1] are whole too
        if param.dim() == 1 or loaded.shape[1] == cols:
            param.data.copy_(loaded)
            return
        param.data.copy_(loaded.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        return tensor_model_parallel_all_reduce(y) if self.tp_size > 1 else y
