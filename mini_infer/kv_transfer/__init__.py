"""Moving KV blocks out of the paged pool and back: the primitive that swap preemption uses today and a
KV connector (prefill/decode disaggregation) can reuse: gather a request's blocks into one contiguous
buffer, scatter a buffer back into other blocks."""

from mini_infer.kv_transfer.block_copy import BlockLayout, gather_blocks, scatter_blocks
from mini_infer.kv_transfer.host_blocks import HostBlockPool

__all__ = ["BlockLayout", "HostBlockPool", "gather_blocks", "scatter_blocks"]
