"""Compile traced programs into MAX graphs and run them.

A program is cut at its scan nodes. Each run of straight-line nodes becomes one MAX graph; each
scan runs its body (compiled once, itself cut the same way) from a Python loop. Compile cost
therefore does not grow with the number of steps. Compiled graphs are exported as MEF files under
the cache directory, keyed by the program fingerprint and the device, so a second process loads
them in milliseconds instead of recompiling.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from modgrad.engine.core import Node, Program, ShapeError, Trace, Value, trace_scope
from modgrad.engine.interpret import run_program
from modgrad.engine.pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu", "numpy")

# Counts real MAX compilations (cache misses) in this process; tests use it to prove reuse.
STATS = {"compiles": 0, "mef_loads": 0, "traces": 0}


def cache_dir() -> Path:
    root = os.environ.get("MODGRAD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "modgrad")
    path = Path(root) / "mef"
    path.mkdir(parents=True, exist_ok=True)
    return path


def devices() -> list[str]:
    """List the devices available here: always "cpu" and "numpy", and "gpu" when MAX finds an accelerator."""
    from max.driver import accelerator_count

    found = ["cpu"]
    if accelerator_count() > 0:
        found.append("gpu")
    found.append("numpy")
    return found


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; available here: {', '.join(devices())}")
    if device == "gpu" and "gpu" not in devices():
        raise ValueError(f"device 'gpu' requested but MAX sees no accelerator; available here: {', '.join(devices())}")
    return device


_SESSIONS: dict = {}


def _runtime(device: str):
    """Return (session, driver device, graph DeviceRef), shared by every program in the process."""
    if device not in _SESSIONS:
        from max.driver import CPU, Accelerator
        from max.engine import InferenceSession
        from max.graph import DeviceRef

        if device == "gpu":
            dev, ref = Accelerator(), DeviceRef.GPU()
        else:
            dev, ref = CPU(), DeviceRef.CPU()
        # The session also needs the host CPU when the program runs on a GPU.
        session_devices = [dev] if device == "cpu" else [dev, CPU()]
        _SESSIONS[device] = (InferenceSession(devices=session_devices), dev, ref)
    return _SESSIONS[device]


# --------------------------------------------------------------------------------------------
# Cutting a program into graph segments and loops


@dataclass
class Segment:
    nodes: list[Node]
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    model: object = None
    glue: Program | None = None  # the segment as a program, when numpy runs it


@dataclass
class Loop:
    node: Node
    body: "Plan | None" = None


class Plan:
    """A program prepared for one device: compiled segments and loops in execution order.

    host_glue: run the straight-line segments between loops with the numpy evaluator instead of
    compiling them. Loop bodies, where the time goes, are always compiled. On a CPU this saves
    one cold graph compile (15-60 s here) per segment, which pays while the glue's arrays are
    small (see ``default_host_glue``).
    """

    def __init__(
        self,
        program: Program,
        device: str,
        name: str = "modgrad",
        host_glue: bool = False,
        kernels: frozenset[str] = frozenset(),
    ):
        self.program = program
        self.device = device
        self.name = name
        self.host_glue = host_glue
        self.kernels = kernels  # fused primitives lowered to Mojo kernels
        self.steps: list[Segment | Loop] = []
        self._cut()
        if device != "numpy":
            self._compile()

    def _cut(self) -> None:
        current: list[Node] = []
        for node in self.program.nodes:
            if node.prim.name == "scan":
                if current:
                    self.steps.append(Segment(current))
                    current = []
                self.steps.append(Loop(node))
            else:
                current.append(node)
        if current:
            self.steps.append(Segment(current))

        # Values that some node or the program's result reads; a loop skips the others.
        self.used = {x.uid for n in self.program.nodes for x in n.inputs if isinstance(x, Value)}
        self.used |= {o.uid for o in self.program.outputs if isinstance(o, Value)}

        # Values each segment must receive and hand on.
        later_uses: dict[int, int] = {}
        for o in self.program.outputs:
            if isinstance(o, Value):
                later_uses[o.uid] = len(self.steps)
        for i, step in enumerate(self.steps):
            nodes = step.nodes if isinstance(step, Segment) else [step.node]
            for n in nodes:
                for x in n.inputs:
                    if isinstance(x, Value):
                        later_uses[x.uid] = max(later_uses.get(x.uid, -1), i)
        for i, step in enumerate(self.steps):
            if not isinstance(step, Segment):
                continue
            defined = {o.uid for n in step.nodes for o in n.outputs}
            seen: set[int] = set()
            for n in step.nodes:
                for x in n.inputs:
                    if isinstance(x, Value) and x.uid not in defined and x.uid not in seen:
                        seen.add(x.uid)
                        step.inputs.append(x)
            step.outputs = [o for n in step.nodes for o in n.outputs if later_uses.get(o.uid, -1) > i]
            self._declare_symbols(step)

    def _declare_symbols(self, seg: Segment) -> None:
        """Add a program input for each symbolic dim the segment uses but none of its inputs declares.

        A MAX graph only knows a symbolic dim through an input type, e.g. ``broadcast_to(w, ("B", 3))``
        where "B" comes from an argument that no op of the segment reads.
        """
        declared = {d for v in seg.inputs for d in v.shape if isinstance(d, str)}
        used = {d for n in seg.nodes for o in n.outputs for d in o.shape if isinstance(d, str)}
        for sym in sorted(used - declared):
            source = next((v for v in self.program.inputs if sym in v.shape), None)
            if source is None:
                raise ShapeError(f"symbolic dim {sym!r} is not declared by any program input")
            seg.inputs.append(source)
            declared.update(d for d in source.shape if isinstance(d, str))

    def _compile(self) -> None:
        for k, step in enumerate(self.steps):
            if isinstance(step, Loop):
                body = step.node.attrs["body"]
                step.body = Plan(body, self.device, name=f"{self.name}_body{k}", kernels=self.kernels)
            elif step.outputs and not self.host_glue:
                step.model = _load_or_compile(step, self.device, f"{self.name}_seg{k}", self.kernels)

    # ----------------------------------------------------------------------------------------

    def run(self, args: list) -> list:
        if self.device == "numpy":
            return run_program(self.program, args)
        env: dict[int, object] = {v.uid: a for v, a in zip(self.program.inputs, args)}
        for step in self.steps:
            if isinstance(step, Segment):
                if not step.outputs:
                    continue
                if step.model is None:
                    if step.glue is None:
                        step.glue = Program(step.inputs, step.nodes, step.outputs)
                    outs = run_program(step.glue, [_to_host(env[x.uid]) for x in step.inputs])
                else:
                    ins = [_to_runtime(env[x.uid], self.device) for x in step.inputs]
                    outs = step.model.execute(*ins)
                for v, o in zip(step.outputs, outs):
                    env[v.uid] = o
            else:
                self._run_loop(step, env)
        return [env[o.uid] if isinstance(o, Value) else o for o in self.program.outputs]

    def _run_loop(self, step: Loop, env: dict) -> None:
        node, a = step.node, step.node.attrs
        nc, ncar = a["n_consts"], a["n_carry"]
        vals = [env[x.uid] if isinstance(x, Value) else x for x in node.inputs]
        # Convert the constants once per loop, because a non-contiguous one would be copied at every step.
        consts = [_to_runtime(c, self.device) for c in vals[:nc]]
        carry = vals[nc : nc + ncar]
        # Step t of an x is per_step[i][t]: a StepStack's buffer as it is, or a row of a host array.
        per_step = [x.items if isinstance(x, StepStack) else np.ascontiguousarray(_to_host(x))
                    for x in vals[nc + ncar :]]
        steps = len(per_step[0]) if per_step else int(a["length"])
        n_y = len(a["body"].outputs) - ncar
        # Stacking per-step values took 37 % of a CTM train step, so only outputs that are read are
        # kept, as StepStacks. The carry history feeds only the loop's VJP, so a backward loop's
        # history is dropped.
        y_used = [node.outputs[ncar + j].uid in self.used for j in range(n_y)]
        hist_used = [node.outputs[ncar + n_y + i].uid in self.used for i in range(ncar)]
        history: list[list] = [[None] * steps for _ in carry]
        ys: list = [None] * steps
        order = range(steps - 1, -1, -1) if a["reverse"] else range(steps)
        for t in order:
            for i, c in enumerate(carry):
                if hist_used[i]:
                    history[i][t] = c
            outs = step.body.run(consts + carry + [x[t] for x in per_step])
            carry = outs[:ncar]
            ys[t] = outs[ncar:]
        stacked_ys = [StepStack([ys[t][j] for t in range(steps)]) if y_used[j] else None for j in range(n_y)]
        stacked_hist = [StepStack(hist) if used else None for hist, used in zip(history, hist_used)]
        for v, o in zip(node.outputs, carry + stacked_ys + stacked_hist):
            env[v.uid] = o


class StepStack:
    """The per-step values of one loop output, stacked on a new leading axis only when read whole.

    A later loop that reads the output step by step (a backward loop reading the forward loop's
    saved residuals and carry history) takes each step's runtime buffer as it is, with no copy
    to the host. Stacking took about a quarter of the profile samples of a CTM train step.
    """

    def __init__(self, items: list):
        self.items = items
        self._stacked: np.ndarray | None = None

    def host(self) -> np.ndarray:
        if self._stacked is None:
            self._stacked = np.stack([_to_host(x) for x in self.items])
        return self._stacked


def _to_host(x):
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, StepStack):
        return x.host()
    if hasattr(x, "to_numpy"):
        from max.driver import CPU

        if hasattr(x, "device") and not x.device.is_host:
            x = x.to(CPU())
        return x.to_numpy()
    return np.asarray(x)


def _to_runtime(x, device: str):
    if isinstance(x, StepStack):
        x = x.host()
    if isinstance(x, (np.ndarray, np.generic)):
        arr = np.asarray(x)
        if not arr.flags.c_contiguous:
            arr = arr.copy()
        from max.driver import Buffer

        if device == "gpu":
            _, dev, _ = _runtime(device)
            return Buffer.from_numpy(arr).to(dev)
        # A Buffer skips execute's check of numpy inputs against a runtime Protocol, about 4 us per
        # input, which a tick body with about 90 inputs pays on every call.
        return Buffer.from_dlpack(arr)
    return x


def _segment_graph(seg: Segment, device: str, name: str, kernels: frozenset[str] = frozenset()):
    from max.graph import Graph, TensorType

    from modgrad.graphs import lower, to_max_dtype
    from modgrad.graphs.kernels import kernel_library_path

    _, _, ref = _runtime(device)
    types = [TensorType(to_max_dtype(v.dtype), list(v.shape), device=ref) for v in seg.inputs]
    broadcasts = _broadcast_values(seg)
    kernels = kernels & {n.prim.name for n in seg.nodes}
    extensions = [kernel_library_path()] if kernels else []
    with Graph(name, input_types=types, custom_extensions=extensions) as graph:
        env = {v.uid: g.tensor for v, g in zip(seg.inputs, graph.inputs)}
        for node in seg.nodes:
            args = [env[x.uid] if isinstance(x, Value) else x for x in node.inputs]
            attrs = node.attrs
            if node.prim.name in _REDUCTIONS and isinstance(node.inputs[0], Value) and node.inputs[0].uid in broadcasts:
                attrs = {**attrs, "broadcast_input": True}
            if node.prim.name in kernels:
                attrs = {**attrs, "kernel": True}
            outs = lower(node.prim.name, args, attrs, ref)
            for v, o in zip(node.outputs, outs):
                env[v.uid] = o
        graph.output(*[env[v.uid] for v in seg.outputs])
    return graph


_REDUCTIONS = {"reduce_sum", "reduce_max", "argmax"}
# Ops whose result we expect MAX to compute into a buffer of its own rather than fuse into its consumer.
_MATERIALISING = _REDUCTIONS | {"matmul", "size_of", "take", "take_add"}
# Fused ops whose built-in lowering broadcasts its inputs as elementwise ops do (graphs/fused.py).
_BROADCASTING_FUSED = {"nlm_glu", "nlm_glu_backward", "sync_update", "sync_update_backward"}


def _broadcast_values(seg: Segment) -> set[int]:
    """Return the uids of values that MAX may fuse into a reduction as a broadcast along an outer axis.

    MAX 26.7 reduces the innermost axis of such an input wrongly (see ``modgrad.graphs.reduce``),
    so reductions of these values take a slower, correct lowering. A broadcast along the innermost
    axis only, as in ``x - max(x, -1)``, reduces correctly and keeps the fast lowering until an op
    that moves axes (reshape, transpose) takes it.
    """
    outer: set[int] = set()
    inner: set[int] = set()  # broadcast along the innermost axis only
    for node in seg.nodes:
        name = node.prim.name
        if name in _MATERIALISING:
            continue
        out = tuple(node.outputs[0].shape)
        elementwise = node.prim.shape_rule.__module__.endswith(".elementwise") or name in _BROADCASTING_FUSED
        kinds: set[str] = set()
        for x in node.inputs:
            uid = x.uid if isinstance(x, Value) else None
            if uid in outer:
                kinds.add("outer")
            elif uid in inner:
                kinds.add("inner" if elementwise else "outer")
            shape = tuple(x.shape) if isinstance(x, Value) else np.shape(x)
            if not (elementwise or name == "broadcast_to") or not shape:
                continue  # a 0-d value broadcasts correctly
            padded = (1,) * (len(out) - len(shape)) + shape
            axes = [i for i, (a, b) in enumerate(zip(padded, out)) if a == 1 and b != 1]
            if any(i < len(out) - 1 for i in axes):
                kinds.add("outer")
            elif axes:
                kinds.add("inner")
        if "outer" in kinds:
            outer.update(o.uid for o in node.outputs)
        elif "inner" in kinds:
            inner.update(o.uid for o in node.outputs)
    return outer


def _segment_key(seg: Segment, device: str, kernels: frozenset[str] = frozenset()) -> str:
    prog = Program(seg.inputs, seg.nodes, seg.outputs)
    import max

    from modgrad.graphs import LOWERING_VERSION
    from modgrad.graphs.kernels import kernel_library_path

    tag = f"{prog.fingerprint()}|{device}|max-{getattr(max, '__version__', '?')}|lowering-{LOWERING_VERSION}"
    used = sorted(kernels & {n.prim.name for n in seg.nodes})
    if used:  # the package folder is named by the hash of the kernel sources
        tag += f"|kernels-{','.join(used)}-{kernel_library_path().parent.name}"
    return hashlib.sha256(tag.encode()).hexdigest()[:32]


def _load_or_compile(seg: Segment, device: str, name: str, kernels: frozenset[str] = frozenset()):
    session, _, _ = _runtime(device)
    path = cache_dir() / f"{_segment_key(seg, device, kernels)}.mef"
    if path.exists():
        try:
            model = session.load(str(path))
            STATS["mef_loads"] += 1
            return model
        except Exception as err:  # a stale or truncated cache file is rebuilt, not fatal
            log.warning("ignoring unreadable compiled cache %s: %s", path, err)
    graph = _segment_graph(seg, device, name, kernels)
    start = time.perf_counter()
    compiled = session.compile(graph)
    STATS["compiles"] += 1
    log.info("compiled %s (%d ops) in %.1f s", name, len(seg.nodes), time.perf_counter() - start)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".mef.tmp")
    os.close(fd)
    try:
        compiled.export_mef(tmp)
        os.replace(tmp, path)
    except Exception as err:
        log.warning("could not write compiled cache %s: %s", path, err)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return session.init(compiled)


# --------------------------------------------------------------------------------------------
# The user-facing compiled function


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray) or isinstance(x, np.generic) or hasattr(x, "to_numpy")


def _shape_dtype(x):
    if hasattr(x, "to_numpy") and not isinstance(x, np.ndarray):
        return tuple(x.shape), np.dtype(x.dtype.to_numpy())
    arr = np.asarray(x)
    return arr.shape, arr.dtype


class CompiledFunction:
    """``fn`` traced once per argument signature and run as MAX graphs on ``device``.

    Array leaves of the arguments are program inputs (their values may change freely between
    calls); every other leaf (int, float, str, None) is static and part of the cache key.
    ``dims`` marks axes as symbolic so one compilation serves every size: a tuple with one
    entry per positional argument, each a tree matching that argument whose leaves are shape
    tuples with str names for symbolic axes (e.g. ``("B", 8)``) or None for static shapes.
    ``kernels`` is described in :func:`compile`.
    """

    def __init__(
        self,
        fn: Callable,
        device: str = "cpu",
        dims: Sequence | None = None,
        name: str | None = None,
        host_glue: bool | None = None,
        kernels: bool | None = None,
    ):
        self.fn = fn
        self.device = check_device(device)
        self.dims = dims
        self.host_glue = host_glue
        if kernels not in (None, True, False):
            raise TypeError(f"kernels must be True, False or None, got {kernels!r}")
        self.kernels = kernels
        self.name = name or getattr(fn, "__name__", "fn").replace("<", "").replace(">", "")
        self._plans: dict = {}

    def _dim_specs(self, args) -> list:
        if self.dims is None:
            return [None] * len(tree_flatten(args)[0])
        if len(self.dims) != len(args):
            raise ValueError(f"dims has {len(self.dims)} entries for {len(args)} positional arguments")
        specs = []
        for spec, arg in zip(self.dims, args):
            n = len(tree_flatten(arg)[0])
            if spec is None:
                specs.extend([None] * n)
                continue
            leaves = _spec_leaves(spec)
            if len(leaves) != n:
                raise ValueError(f"dims entry {spec!r} has {len(leaves)} shapes for {n} arrays")
            specs.extend(leaves)
        return specs

    def signature(self, args) -> tuple:
        leaves, td = tree_flatten(args)
        specs = self._dim_specs(args)
        sig = []
        for leaf, spec in zip(leaves, specs):
            if _is_array(leaf):
                shape, dtype = _shape_dtype(leaf)
                if spec is not None:
                    if len(spec) != len(shape):
                        raise ShapeError(f"dims {spec} has rank {len(spec)} but the argument has shape {shape}")
                    for d, n in zip(spec, shape):
                        if isinstance(d, int) and d != n:
                            raise ShapeError(f"dims {spec} expects size {d} where the argument has {n}")
                    shape = tuple(spec)
                sig.append(("array", shape, dtype.str))
            else:
                sig.append(("static", repr(leaf)))
        return td, tuple(sig)

    def __call__(self, *args):
        key = self.signature(args)
        entry = self._plans.get(key)
        if entry is None:
            entry = self._build(args, key)
            self._plans[key] = entry
        plan, out_td, in_positions = entry
        leaves, _ = tree_flatten(args)
        inputs = [leaves[i] for i in in_positions]
        if self.device == "cpu" and plan.host_glue:
            # MAX's worker threads keep spinning for a while after each graph call, so numpy's
            # multi-threaded BLAS in the glue waits for a core. In the maze-config CTM train step on
            # 2 cores, one (16, 128, 100) x (16, 100, 128) product took up to 292 ms this way, and at
            # most 5 ms with one BLAS thread.
            with _blas_controller().limit(limits=1, user_api="blas"):
                outs = plan.run(inputs)
        else:
            outs = plan.run(inputs)
        return tree_unflatten(out_td, [_present(o, self.device) for o in outs])

    def _build(self, args, key):
        td, sig = key
        leaves, _ = tree_flatten(args)
        trace = Trace(name=f"compile {self.name}", device=self.device)
        STATS["traces"] += 1
        in_positions = []
        with trace_scope(trace):
            traced = []
            for i, (leaf, entry) in enumerate(zip(leaves, sig)):
                if entry[0] == "array":
                    traced.append(trace.placeholder(entry[1], np.dtype(entry[2])))
                    in_positions.append(i)
                else:
                    traced.append(leaf)
            out = self.fn(*tree_unflatten(td, traced))
        out_leaves, out_td = tree_flatten(out)
        program = Program(trace.inputs, trace.nodes, out_leaves)
        start = time.perf_counter()
        has_loops = any(n.prim.name == "scan" for n in program.nodes)
        input_elements = sum(int(np.prod(_shape_dtype(leaves[i])[0])) for i in in_positions)
        host_glue = self.host_glue
        if host_glue is None:
            host_glue = default_host_glue(self.device, has_loops, input_elements)
        kernels = frozenset()
        if self.device != "numpy":
            from modgrad.graphs.fused import kernel_ops

            kernels = kernel_ops(self.kernels)
        plan = Plan(program, self.device, name=self.name, host_glue=host_glue, kernels=kernels)
        log.debug("prepared %s for %s in %.1f s", self.name, self.device, time.perf_counter() - start)
        return plan, out_td, in_positions


# Numpy glue makes one single-core pass over memory per elementwise op, where a compiled segment
# fuses them on every core: 857-958 -> 744-805 ms for the maze-config CTM step (7.9 M values).
# NOTE: the threshold comes from that one program, and the crossover was not searched for.
GLUE_COMPILE_ELEMENTS = 4_000_000


def default_host_glue(device: str, has_loops: bool, input_elements: int) -> bool:
    """Return whether numpy runs the straight-line parts between loops (see ``Plan``).

    Only on the CPU and only around loops: a loop-free program compiles whole. Programs whose
    inputs contain at least ``GLUE_COMPILE_ELEMENTS`` values compile their glue too.
    """
    return device == "cpu" and has_loops and input_elements < GLUE_COMPILE_ELEMENTS


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _spec_leaves(spec) -> list:
    """Shape tuples inside a dims tree: a tuple whose items are all int/str is one shape."""
    if spec is None:
        return [None]
    if isinstance(spec, tuple) and all(isinstance(d, (int, str)) for d in spec):
        return [spec]
    if isinstance(spec, dict):
        return [s for k in sorted(spec) for s in _spec_leaves(spec[k])]
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in _spec_leaves(item)]
    raise ValueError(f"cannot read dims entry {spec!r}")


def _present(x, device: str):
    """CPU results come back as numpy arrays (zero-copy); GPU results stay on the device."""
    if isinstance(x, StepStack):
        return x.host()
    if device == "gpu" or isinstance(x, np.ndarray):
        return x
    if hasattr(x, "to_numpy"):
        return x.to_numpy()
    return np.asarray(x)


def compile(
    fn: Callable,
    device: str = "cpu",
    dims: Sequence | None = None,
    name: str | None = None,
    host_glue: bool | None = None,
    kernels: bool | None = None,
) -> CompiledFunction:
    """Compile ``fn`` for ``device``: "cpu" or "gpu" (MAX graphs) or "numpy" (the reference evaluator).

    host_glue: run the straight-line parts between loops with numpy (see ``Plan``); by default on
    for "cpu" programs that contain loops and whose array inputs contain fewer than
    ``GLUE_COMPILE_ELEMENTS`` (4 M) values, off otherwise.
    kernels: lower the fused ops (``ops.nlm_glu``, ``ops.sync_update``, their gradients,
    ``ops.matvec`` and the three attention ops) to the Mojo kernels of ``mojo_kernels/`` (True) or to MAX built-in ops (False). None reads the environment
    variable ``MODGRAD_KERNELS`` (1 or 0) and, when it is unset, uses each op's default from
    ``modgrad.graphs.fused.KERNEL_DEFAULTS``: on where the kernel measured faster on a CPU. The
    kernels take float32 only; other dtypes use the built-in ops whatever the flag. The first
    kernel compile also builds the kernel package (about 10 s, cached on disk). The setting is
    part of the compiled-graph cache key.
    """
    return CompiledFunction(fn, device=device, dims=dims, name=name, host_glue=host_glue, kernels=kernels)
