"""8-bit weights and activations (W8A8) through the linear-method seam of layers/linear.py.

One file per idea: w8a8.py (the linear method: 8-bit weight + scales, dynamic activation quantization,
the scaled GEMM), fp8.py (online `quantization="fp8"` and HF `quant_method: "fp8"` block checkpoints),
int8.py (online `"int8"`), compressed_tensors.py (compressed-tensors `float-quantized` / `int-quantized`
checkpoints), setup.py (picks the config for a model and swaps each projection's method). This module
imports nothing heavy: config.py validates names against it without loading torch. docs/quantization.md.
"""

QUANTIZATION_METHODS = ("fp8", "int8", "compressed-tensors")
