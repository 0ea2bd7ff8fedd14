"""The primitive families. Importing this package registers every primitive."""

from modgrad.engine.prims import control, elementwise, fused, linalg, norm, reduce, shape  # noqa: F401
