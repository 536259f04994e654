"""Benchmarks: throughput, latency and serving, measured against the roofline and peers."""
