"""Executors: how the engine's one call per step, `execute_model(SchedulerOutput)`, reaches every rank.

Rank 0 is the engine's own process: it schedules, runs its ModelRunner and samples. The other ranks are
workers started by the `mp` executor (spawned processes on this host) or the `ray` one (actors in a
placement group, one bundle per GPU). One process (tensor_parallel_size 1) has no executor work at all:
`execute_model` calls the runner's own `execute`.
"""

from __future__ import annotations

from pathlib import Path

from mini_infer.config import EngineConfig
from mini_infer.distributed.parallel_state import check_no_live_group, check_parallel_sizes
from mini_infer.model_loader import load_hf_config
from mini_infer.worker.model_runner import ModelRunner


class ExecutorError(RuntimeError):
    """A worker failed or died: the ranks are out of step, so the engine cannot go on."""


class UniProcExecutor:
    """One rank: the engine calls the runner directly."""

    def bind(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute_model(self, out):
        return self.runner.execute(out)  # looked up per call: tests and observers may wrap the runner's

    def shutdown(self) -> None:
        pass


def make_executor(config: EngineConfig, path: Path, max_model_len: int):
    """The executor for config's parallelism. With more than one rank this starts the workers and joins
    rank 0 to their group, so it comes before the model is built (layers shard by the group's size)."""
    tp = config.tensor_parallel_size
    check_parallel_sizes(load_hf_config(path), tp, config.enable_expert_parallel)
    check_no_live_group()
    if tp == 1:
        return UniProcExecutor()
    if config.resolved_device.type == "cuda" and config.distributed_executor_backend != "ray":  # one host
        import torch

        if tp > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} GPUs; this host shows {torch.cuda.device_count()}")
    if config.distributed_executor_backend == "ray":
        from mini_infer.distributed.executor_ray import RayExecutor

        return RayExecutor(config, path, max_model_len)
    from mini_infer.distributed.executor_mp import MultiprocExecutor

    return MultiprocExecutor(config, path, max_model_len)


class DistributedExecutor:
    """Rank 0's side of a group: sends each step to the workers, then runs it here.

    A step goes out as one pickle of the SchedulerOutput, its sequences cut down to what a forward pass
    reads (wire.py: block tables, the tokens of the chunk, sampling parameters), written to each worker
    before rank 0 starts its own forward, so the workers' forwards overlap rank 0's. Any failure inside a step is fatal
    (ExecutorError): a rank that missed a collective leaves the group out of step."""

    def __init__(self) -> None:
        self.runner: ModelRunner | None = None
        self.failed: str | None = None

    def bind(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute_model(self, out):
        import pickle

        from mini_infer.distributed.wire import wire_output

        if self.failed is not None:
            raise ExecutorError(self.failed)
        data = pickle.dumps(wire_output(out), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.send_step(data)
            return self.runner.execute(out)
        except Exception as exc:
            self.failed = f"tensor-parallel step failed: {self.worker_failure() or f'rank 0: {exc!r}'}"
            self.shutdown()
            raise ExecutorError(self.failed) from exc

    # the transport, per executor
    def send_step(self, data: bytes) -> None:
        raise NotImplementedError

    def worker_failure(self) -> str | None:
        """What went wrong on a worker, if anything did (waits briefly for its report)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
