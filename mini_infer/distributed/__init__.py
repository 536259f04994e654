"""Tensor and expert parallelism: who this process is (parallel_state.py), the collectives the layers
use (communication_op.py), and the executors that start one worker per rank (executor*.py, worker.py)."""

from mini_infer.distributed.parallel_state import (
    check_parallel_sizes,
    get_ep_size,
    get_tp_rank,
    get_tp_size,
)

__all__ = ["check_parallel_sizes", "get_ep_size", "get_tp_rank", "get_tp_size"]
