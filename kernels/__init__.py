"""Fused GPU kernels (Triton), each with a plain-PyTorch reference."""
