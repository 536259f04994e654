"""Attention backends: the kernels a layer's attention runs and the metadata they read."""

from mini_infer.attention.backend import AttentionBackend, AttentionMetadata, get_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
