"""Triton kernels on the packed KV layout (importable as `sglang_kvc.kernels`)."""
