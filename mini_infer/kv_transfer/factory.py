"""Which class a `kv_transfer_config`'s `kv_connector` names (imported only when one is configured)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mini_infer.kv_transfer.config import KVTransferConfig
from mini_infer.kv_transfer.connector_base import KVConnectorBase

if TYPE_CHECKING:
    from mini_infer.worker.kv_cache import KVCache


def make_kv_connector(config: KVTransferConfig, kv_cache: KVCache, model_id: str = "") -> KVConnectorBase:
    if config.kv_connector == "SharedStorageConnector":
        from mini_infer.kv_transfer.shared_storage import SharedStorageConnector

        return SharedStorageConnector(config, kv_cache, model_id)
    from mini_infer.kv_transfer.shared_memory import SharedMemoryConnector

    return SharedMemoryConnector(config, kv_cache, model_id)
