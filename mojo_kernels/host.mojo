"""CPU runtime helpers shared by the kernels."""

from max.gpu.host import DeviceContext
from max.gpu.host.device_context import DeviceContextBase
from std.sys.info import CompilationTarget


@always_inline
def host_context(
    ctx: DeviceContext,
) -> Optional[DeviceContextBase[CompilationTarget()]]:
    """Return the op's context as the CPU runtime helpers take it.

    Without it `sync_parallelize` runs on a thread pool of its own beside the
    engine's, and the two oversubscribe the cores: inside a CTM tick graph the
    NLM kernels then ran slower than MAX's built-in ops (2-core CPU).
    """
    return Optional(rebind[DeviceContextBase[CompilationTarget()]](ctx))
