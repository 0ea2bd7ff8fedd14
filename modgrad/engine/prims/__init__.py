"""The primitive families. Importing this package registers every primitive."""

from modgrad.engine.prims import attention, control, elementwise, fused, linalg, norm, reduce, shape  # noqa: F401
