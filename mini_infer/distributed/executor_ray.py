"""The `ray` executor: ranks 1..N-1 as Ray actors in a placement group of one bundle per GPU (one CPU per
rank off CUDA), so the ranks can span the nodes of a Ray cluster. Rank 0 is this process and holds
bundle 0's place; `ray` is an optional extra (`pip install mini-infer[ray]`).

Each step is one actor call per worker carrying the pickled SchedulerOutput (Ray runs an actor's calls
in order). A worker that raises logs its traceback and exits, which closes its sockets so that rank 0's
collective fails; rank 0 then raises ExecutorError with what Ray says of the actor.
"""

from __future__ import annotations

import logging
import os
import traceback
import weakref
from pathlib import Path

from mini_infer.config import EngineConfig
from mini_infer.distributed.executor import DistributedExecutor, ExecutorError, free_port
from mini_infer.distributed.parallel_state import collective_timeout, destroy_distributed, init_distributed
from mini_infer.distributed.worker import backend_for, worker_env

logger = logging.getLogger(__name__)


class RayWorker:
    """The actor: a distributed/worker.py Worker built by `start`, then one `execute` per step."""

    def start(self, rank: int, world: int, init_method: str, config: EngineConfig, path: str, max_model_len: int):
        from mini_infer.distributed.worker import Worker

        self.rank = rank
        try:
            self.worker = Worker(rank, world, init_method, config, path, max_model_len)
        except BaseException:
            self._die()
        return self.worker.num_blocks

    def execute(self, data: bytes) -> None:
        try:
            self.worker.execute(data)
        except BaseException:
            self._die()

    def _die(self) -> None:
        logger.error("tensor-parallel worker %d failed:\n%s", self.rank, traceback.format_exc())
        os._exit(1)


def _stop(actors: list, pg) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:
            pass
    if pg is not None:
        try:
            ray.util.remove_placement_group(pg)
        except Exception:
            pass
    destroy_distributed()


class RayExecutor(DistributedExecutor):
    def __init__(self, config: EngineConfig, path: Path, max_model_len: int) -> None:
        super().__init__()
        try:
            import ray
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ValueError("distributed_executor_backend='ray' needs ray: pip install 'mini-infer[ray]'") from e
        world = config.tensor_parallel_size
        cuda = config.resolved_device.type == "cuda"
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=True)
        bundle = {"GPU": 1, "CPU": 1} if cuda else {"CPU": 1}
        self.pg = ray.util.placement_group([bundle] * world, strategy="PACK")
        self.actors: list = []
        self._finalizer = weakref.finalize(self, _stop, self.actors, self.pg)
        timeout = collective_timeout().total_seconds()
        try:
            ready, _ = ray.wait([self.pg.ready()], timeout=timeout)
            if not ready:
                raise ExecutorError(f"Ray could not place {world} bundles of {bundle} within {timeout:.0f}s")
            init_method = f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"
            actor_cls = ray.remote(num_cpus=1, num_gpus=1 if cuda else 0)(RayWorker)
            path_env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
            env = {"env_vars": {**worker_env(), **path_env}}  # the driver's import path (a checkout)
            for rank in range(1, world):
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
                actor = actor_cls.options(scheduling_strategy=strategy, runtime_env=env).remote()
                self.actors.append(actor)
            self.started = [
                a.start.remote(rank, world, init_method, config, str(path), max_model_len)
                for rank, a in enumerate(self.actors, start=1)
            ]
            index = 0 if cuda else None
            init_distributed(0, world, init_method, backend_for(config), config.enable_expert_parallel, index)
        except BaseException:
            self.shutdown()
            raise
        self.pending: list = []

    def bind(self, runner) -> None:
        import ray

        super().bind(runner)
        try:
            ray.get(self.started, timeout=collective_timeout().total_seconds())
        except BaseException as exc:
            self.shutdown()
            raise ExecutorError(f"a Ray tensor-parallel worker failed while starting: {exc}") from exc

    def send_step(self, data: bytes) -> None:
        self.pending = [a.execute.remote(data) for a in self.actors]

    def worker_failure(self) -> str | None:
        import ray

        if not self.pending:
            return None
        ready, _ = ray.wait(self.pending, num_returns=len(self.pending), timeout=5)
        for rank, ref in enumerate(self.pending, start=1):
            if ref in ready:
                try:
                    ray.get(ref)
                except Exception as exc:
                    return f"worker {rank} (a Ray actor) died: {type(exc).__name__}: {str(exc)[:500]}"
        return None

    def shutdown(self) -> None:
        self._finalizer()
