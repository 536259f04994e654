"""One tensor-parallel rank other than 0: its model shard, its KV shard, and a step loop.

A worker builds what the engine builds on rank 0 (the model on this rank's slices, a ModelRunner, the
KV pool: the ranks agree on its size), then runs each SchedulerOutput rank 0 sends it through the same
`ModelRunner.execute`, so every rank meets the same collectives in the same order. It does not sample:
rank 0 samples and broadcasts the tokens, which the next step's pending inputs read on every rank.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from mini_infer.attention import get_attention_backend
from mini_infer.config import EngineConfig
from mini_infer.distributed.communication_op import broadcast_from_driver
from mini_infer.distributed.parallel_state import init_distributed
from mini_infer.model_loader import checkpoint_dtype, load_hf_config, load_model
from mini_infer.sampler import DeviceSample
from mini_infer.scheduler import ScheduledSeq
from mini_infer.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def worker_env() -> dict[str, str]:
    """Environment every worker process gets: NVLink SHARP (NVLS) off, whose multicast buffers the
    lent multi-GPU machines do not support and that small all-reduces do not need."""
    return {"NCCL_NVLS_ENABLE": "0"}


def backend_for(config: EngineConfig) -> str:
    return "nccl" if config.resolved_device.type == "cuda" else "gloo"


class WorkerModelRunner(ModelRunner):
    """A ModelRunner that takes rank 0's sampled tokens instead of sampling."""

    def _sample(
        self, logits: torch.Tensor, sampling: list[ScheduledSeq], grammar_bitmask: tuple | None = None
    ) -> DeviceSample:
        tokens = torch.empty(len(sampling), dtype=torch.int64, device=self.device)
        return DeviceSample(broadcast_from_driver(tokens), None)


class Worker:
    """Joins the group as `rank`, builds the shard and the KV pool; `execute` runs one step."""

    def __init__(
        self, rank: int, world_size: int, init_method: str, config: EngineConfig, path: str, max_model_len: int
    ) -> None:
        os.environ.update(worker_env())
        device = config.resolved_device
        if device.type == "cpu":
            torch.set_num_threads(1)  # ranks share the host's cores
        index = rank if device.type == "cuda" else None
        init_distributed(rank, world_size, init_method, backend_for(config), config.enable_expert_parallel, index)
        torch.manual_seed(config.seed)
        hf_config = load_hf_config(Path(path))
        dtype = config.resolve_dtype(checkpoint_dtype(hf_config))
        backend = get_attention_backend(config.resolved_kernel_backend, config.block_size, device)
        model = load_model(
            Path(path), hf_config, backend.ops, dtype, device, config.load_format, config.seed, config.quantization
        )
        self.runner = WorkerModelRunner(model, config, hf_config, dtype, device, max_model_len, backend)
        self.num_blocks = self.runner.init_kv_cache()

    def execute(self, data: bytes) -> None:
        self.runner.execute(pickle.loads(data))


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies, however the parent ends."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def run_mp_worker(
    rank: int, world_size: int, init_method: str, config: EngineConfig, path: str, max_model_len: int, conn: Connection
) -> None:
    """A spawned worker's life: report started, build, report ready, then one step per message until an
    empty one (shutdown) or the parent's end of the pipe closes. Any exception is sent to the parent and
    ends the process, which closes its sockets so that rank 0's pending collective fails at once."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to rank 0, which shuts the workers down
    try:
        conn.send(("started", None))
        worker = Worker(rank, world_size, init_method, config, path, max_model_len)
        conn.send(("ready", worker.num_blocks))
        while data := conn.recv_bytes():
            worker.execute(data)
    except EOFError:  # rank 0 is gone
        pass
    except BaseException as exc:
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except OSError:
            pass
        os._exit(1)
    os._exit(0)  # skip interpreter teardown: the process group's threads may still hold locks
