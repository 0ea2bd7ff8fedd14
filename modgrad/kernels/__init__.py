"""Mojo custom-op kernels: the package build, the numpy oracles and a torch bridge.

The MAX-graph side of each kernel lives in ``modgrad.graphs.kernels``. This package contains
what does not need a graph: ``build`` (precompile ``mojo_kernels/`` into a cached ``.mojoc``),
``reference`` (the numpy implementations every kernel is tested against), ``adamw`` (the
host-side coefficients of the AdamW kernel) and ``torch_bridge`` (the same ops on torch
tensors, imported on demand because it needs torch).
"""

from modgrad.kernels.adamw import adamw_hyper
from modgrad.kernels.build import KernelBuild, build_kernels, kernel_source_dir

__all__ = ["KernelBuild", "adamw_hyper", "build_kernels", "kernel_source_dir"]
