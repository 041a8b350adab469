"""Kernels behind the ``quaff`` ops: ``reference`` (plain PyTorch, float64 oracle) and ``cpu`` (int8 GEMM)."""
