"""Device-specific speed-ups that keep the model code plain (see :mod:`focalnet.ops.cpu`)."""

from focalnet.ops.cpu import use_cpu_kernels

__all__ = ["use_cpu_kernels"]
