"""KVTransferConfig: vLLM's `kv_transfer_config` dict, validated (no torch: the CLI parses it)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

ROLES = ("kv_producer", "kv_consumer", "kv_both")
CONNECTORS = ("SharedStorageConnector", "SharedMemoryConnector")


@dataclass(frozen=True)
class KVTransferConfig:
    """kv_connector: which connector moves the KV; kv_role: whether this engine saves what it prefills
    (producer), loads what it finds (consumer) or both; kv_connector_extra_config: the connector's own
    settings (shared_storage_path for SharedStorageConnector, shared_memory_* for SharedMemoryConnector)."""

    kv_connector: str
    kv_role: str = "kv_both"
    kv_connector_extra_config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kv_connector not in CONNECTORS:
            raise ValueError(
                f"kv_transfer_config kv_connector must be one of {list(CONNECTORS)}, got {self.kv_connector!r}"
            )
        if self.kv_role not in ROLES:
            raise ValueError(f"kv_transfer_config kv_role must be one of {list(ROLES)}, got {self.kv_role!r}")
        extra = self.kv_connector_extra_config
        if not isinstance(extra, dict):
            raise ValueError(f"kv_transfer_config kv_connector_extra_config must be a dict, got {extra!r}")
        if self.kv_connector == "SharedStorageConnector" and not isinstance(extra.get("shared_storage_path"), str):
            raise ValueError(
                "kv_transfer_config: SharedStorageConnector needs "
                'kv_connector_extra_config={"shared_storage_path": DIR}'
            )

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    @classmethod
    def parse(cls, value: KVTransferConfig | dict | str | None) -> KVTransferConfig | None:
        """From what a user passes: this class, a dict, or its JSON (the CLI's --kv-transfer-config)."""
        if value is None or isinstance(value, KVTransferConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"kv_transfer_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"kv_transfer_config must be a dict (or its JSON), got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"kv_transfer_config has unknown keys {unknown}; it takes {sorted(known)}")
        if "kv_connector" not in value:
            raise ValueError("kv_transfer_config needs 'kv_connector'")
        return cls(**value)
