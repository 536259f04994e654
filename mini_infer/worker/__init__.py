"""The worker side of a step: inputs (step_inputs.py), the KV pool (kv_cache.py), CUDA graphs
(cuda_graphs.py) and the runner that owns the model (model_runner.py)."""
