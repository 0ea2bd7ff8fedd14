"""Host-side shape and layout checks shared by the kernels."""

from extensibility import ManagedTensorSlice


def check_dim(
    op: StaticString,
    name: StaticString,
    t: ManagedTensorSlice,
    axis: Int,
    expected: Int,
) raises:
    """Raise unless `t.dim_size(axis) == expected`."""
    var got = t.dim_size(axis)
    if got != expected:
        raise Error(
            op, ": ", name, " has size ", got, " on axis ", axis, ", expected ",
            expected,
        )


def check_dense(
    op: StaticString, name: StaticString, t: ManagedTensorSlice
) raises:
    """Raise unless `t` is row-major and packed, as the kernels index it flat."""
    var stride = 1
    var axis = t.rank - 1
    while axis >= 0:
        if t.dim_size(axis) > 1 and t.strides()[axis] != stride:
            raise Error(
                op, ": ", name, " is not a packed row-major tensor (stride ",
                t.strides()[axis], " on axis ", axis, ", expected ", stride,
                "); make it contiguous before the call",
            )
        stride *= t.dim_size(axis)
        axis -= 1
