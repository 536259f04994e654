"""The `mp` executor: workers for ranks 1..N-1 as spawned processes on this host.

Steps reach a worker through its own pipe (one pickle, written to each); the pipe also carries the
worker's "started", "ready" and "error" reports back. Workers are daemons that the kernel also kills
when this process dies (PR_SET_PDEATHSIG), so none outlives its engine: not on a normal exit, not on
Ctrl-C, not when this process is killed. A worker that fails reports its traceback and exits; its
closed sockets make rank 0's pending collective fail, and rank 0 raises ExecutorError with the report.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import time
import weakref
from pathlib import Path

from mini_infer.config import EngineConfig
from mini_infer.distributed.executor import DistributedExecutor, ExecutorError, free_port
from mini_infer.distributed.parallel_state import collective_timeout, destroy_distributed, init_distributed
from mini_infer.distributed.worker import backend_for, run_mp_worker, worker_env


@contextlib.contextmanager
def _main_not_reimported():
    """Spawned children re-run the parent's main script unless told not to, which would start a second
    engine from a script without an `if __name__ == "__main__"` guard. The workers' code lives in
    mini_infer, so they are spawned as if the parent had no main file."""
    main = sys.modules["__main__"]
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
    for k in saved:
        setattr(main, k, None) if k == "__spec__" else delattr(main, k)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


def _stop(procs: list, conns: list) -> None:
    """Asks each worker to exit, then kills what has not within a few seconds; leaves the group."""
    for conn in conns:
        try:
            conn.send_bytes(b"")
        except OSError:
            pass
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1)
    for conn in conns:
        conn.close()
    destroy_distributed()


class MultiprocExecutor(DistributedExecutor):
    def __init__(self, config: EngineConfig, path: Path, max_model_len: int) -> None:
        super().__init__()
        world = config.tensor_parallel_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        saved = {k: os.environ.get(k) for k in worker_env()}
        os.environ.update(worker_env())  # spawned children copy this process's environment
        try:
            for rank in range(1, world):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=run_mp_worker,
                    args=(rank, world, init_method, config, str(path), max_model_len, child),
                    name=f"mini-infer-tp{rank}",
                    daemon=True,
                )
                with _main_not_reimported():
                    proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)
        try:
            self._wait_for("started")  # imports done: a worker that cannot start fails here, not in a hang
            index = 0 if config.resolved_device.type == "cuda" else None
            init_distributed(0, world, init_method, backend_for(config), config.enable_expert_parallel, index)
        except BaseException:
            self.shutdown()
            raise

    def _wait_for(self, what: str) -> None:
        deadline = time.monotonic() + collective_timeout().total_seconds()
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.1):
                if not proc.is_alive():
                    raise ExecutorError(f"tensor-parallel worker {rank} exited (code {proc.exitcode}) while starting")
                if time.monotonic() > deadline:
                    raise ExecutorError(f"tensor-parallel worker {rank} did not start within {collective_timeout()}")
            kind, detail = conn.recv()
            if kind != what:
                raise ExecutorError(f"tensor-parallel worker {rank} failed while starting: {detail}")

    def bind(self, runner) -> None:
        super().bind(runner)
        try:
            self._wait_for("ready")
        except BaseException:
            self.shutdown()
            raise

    def send_step(self, data: bytes) -> None:
        for conn in self.conns:
            conn.send_bytes(data)

    def worker_failure(self) -> str | None:
        deadline = time.monotonic() + 2  # a failing worker reports, then exits: give it a moment
        while time.monotonic() < deadline:
            for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
                try:
                    if conn.poll():
                        kind, detail = conn.recv()
                        if kind == "error":
                            return f"worker {rank} raised {detail}"
                except (EOFError, OSError):
                    pass
                if not proc.is_alive():
                    return f"worker {rank} died (exit code {proc.exitcode})"
            time.sleep(0.05)
        return None

    def shutdown(self) -> None:
        self._finalizer()
