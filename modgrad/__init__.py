"""modgrad: Continuous Thought Machine brains with exact gradients, compiled with Modular MAX."""

from modgrad.engine import ShapeError, grad, scan, value_and_grad
from modgrad import ops

__version__ = "0.1.0"


def compile(fn, device: str = "cpu", **kwargs):
    """Compile ``fn`` into MAX graphs for ``device`` ("cpu", "gpu" or "numpy"); see ``modgrad.engine.compile``."""
    from modgrad.engine.compile import compile as _compile

    return _compile(fn, device=device, **kwargs)


def devices() -> list[str]:
    """List the devices this machine can run compiled programs on."""
    from modgrad.engine.compile import devices as _devices

    return _devices()


__all__ = ["ShapeError", "compile", "devices", "grad", "ops", "scan", "value_and_grad", "__version__"]
