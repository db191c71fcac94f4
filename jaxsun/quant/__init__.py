"""Quantization: codebook (AQLM-style) quantization of linear layers for the Psumbook GEMM."""
