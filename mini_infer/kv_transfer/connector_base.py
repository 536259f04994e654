"""The KV connector interface, in the shape of vLLM's v1 `KVConnectorBase_V1`, smaller.

A connector moves a request's KV blocks between engines so that one engine prefills a prompt (the
producer) and another decodes it without computing the prompt again (the consumer). It has two sides:

- scheduler side: how many of a waiting request's prompt tokens can be loaded rather than computed
  (`get_num_new_matched_tokens`), the blocks they were given (`update_state_after_alloc`), what the
  worker must load and save in a step (`build_connector_meta`), and forgetting a request
  (`request_finished`);
- worker side: the KV pool (`register_kv_caches`), loading blocks before the forward pass
  (`start_load_kv`) and saving the blocks a step computed after it (`wait_for_save`).

mini-infer runs both sides in one process (the connector refuses tensor parallelism), and each transfer
completes inside its step: loads before the forward pass, saves before `execute` returns. So there is
no vLLM `wait_for_layer_load` / `save_kv_layer` pair (KV moves per request, not per layer) and no
`get_finished` (nothing is still in flight after a step, so no block's release is delayed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mini_infer.scheduler import SchedulerOutput
    from mini_infer.sequence import Sequence
    from mini_infer.worker.kv_cache import KVCache


@dataclass
class KVConnectorMetadata:
    """One step's transfers, built by the scheduler side for the worker side."""

    load_block_ids: list[int] = field(default_factory=list)  # device blocks to fill, before the forward pass
    load_rows: torch.Tensor | None = None  # [len(load_block_ids), block_bytes] uint8 on the host, in that order
    save_block_ids: list[int] = field(default_factory=list)  # device blocks this step computes, to save after it
    save_hashes: list[int] = field(default_factory=list)  # each one's key: its chained prompt-block hash

    def __bool__(self) -> bool:
        return bool(self.load_block_ids or self.save_block_ids)


class KVConnectorBase(ABC):
    # -- scheduler side -----------------------------------------------------------------------
    @abstractmethod
    def get_num_new_matched_tokens(self, seq: Sequence, num_computed_tokens: int) -> int:
        """Tokens after the num_computed_tokens found in the local prefix cache that can be loaded: a
        multiple of the block size, never reaching the prompt's last token (it must run to be sampled)."""

    @abstractmethod
    def update_state_after_alloc(self, seq: Sequence, block_ids: list[int], num_external_tokens: int) -> None:
        """seq was admitted with num_external_tokens to load into its block table block_ids."""

    @abstractmethod
    def build_connector_meta(self, out: SchedulerOutput) -> KVConnectorMetadata | None:
        """The step's loads (those admitted since the last call) and saves (prompt blocks it completes)."""

    @abstractmethod
    def request_finished(self, seq: Sequence) -> None:
        """seq finished, was aborted or failed: drop what is kept for it."""

    # -- worker side --------------------------------------------------------------------------
    @abstractmethod
    def register_kv_caches(self, kv_cache: KVCache) -> None:
        """The allocated KV pool the transfers read and write."""

    @abstractmethod
    def start_load_kv(self, meta: KVConnectorMetadata) -> None:
        """Fills the step's loaded blocks, ordered before its forward pass."""

    @abstractmethod
    def wait_for_save(self, meta: KVConnectorMetadata) -> None:
        """Saves the blocks the step computed; returns once they are stored."""

    # -- counters (EngineStats) ---------------------------------------------------------------
    num_loaded_tokens: int = 0  # prompt tokens loaded instead of computed
    num_saved_tokens: int = 0  # prompt tokens saved for another engine (blocks already stored are skipped)
