"""Custom MAX ops for modgrad's hot paths.

Each module registers its ops with `@register`; `modgrad.kernels.build`
precompiles this folder into one `.mojoc` package that a MAX graph loads
through `custom_extensions`.
"""
