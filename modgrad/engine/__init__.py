"""The engine: primitives, tracing, reverse-mode gradients, numpy evaluation and MAX compilation."""

from modgrad.engine import prims  # noqa: F401  (registers the primitives)
from modgrad.engine.autodiff import grad, value_and_grad
from modgrad.engine.core import PRIMITIVES, Program, ShapeError, Trace, TraceError, Value
from modgrad.engine.prims.control import scan

__all__ = ["PRIMITIVES", "Program", "ShapeError", "Trace", "TraceError", "Value", "grad", "scan", "value_and_grad"]
