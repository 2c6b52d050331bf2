"""Every private torch name fastres uses, in one place, each with a version check and a
public fallback.

torch's optimizers and AMP are built from ops that torch does not promise to keep
(`torch._foreach_*`, `torch._fused_sgd_`, `torch._amp_*`) and from compiler settings
(`torch._dynamo.config.trace_autograd_ops`, `mark_static_address`). fastres uses them for
the same reason torch does: one launch for many tensors, no host sync. Each is looked up
here once; where a torch release lacks it, the public fallback below runs the same
arithmetic with public tensor methods (slower: one launch per tensor), or a feature that
cannot work without it says so in one line (`compile=step` without
`trace_autograd_ops`).

torch's fused optimizer ops with a tensor learning rate have no fake (meta) kernel in
torch 2.11-2.14, so a compiled step cannot call them ("no fake impl or Meta kernel
registered"); `fastres.config.resolve` runs the foreach arithmetic under `compile=step`,
which Inductor fuses into a few kernels itself, and refuses `optim.impl=fused` there.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Sequence

import torch
from torch import Tensor

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


# --------------------------------------------------------------------------- foreach

class _Foreach:
    """`foreach.add_(tensors, ...)` is `torch._foreach_add_(tensors, ...)`, or, where torch
    has no such op, the same call made tensor by tensor with public methods: list arguments
    are zipped, scalars and single tensors broadcast."""

    def __getattr__(self, name: str) -> Callable:
        op = getattr(torch, f"_foreach_{name}", None)
        if op is None:
            op = _per_tensor(name)
        setattr(self, name, op)
        return op


def _per_tensor(name: str) -> Callable:
    def call(tensors: Sequence[Tensor], *args, **kwargs):
        out = []
        for i, t in enumerate(tensors):
            a = [v[i] if isinstance(v, (list, tuple)) else v for v in args]
            out.append(getattr(t, name)(*a, **kwargs) if name != "norm" else
                       torch.linalg.vector_norm(t, *a, **kwargs))
        return None if name.endswith("_") else out
    return call


foreach = _Foreach()


# --------------------------------------------------------------------------- AMP

def amp_unscale_(grads: list[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """grads *= inv_scale in place; found_inf (0-d fp32) set to 1.0 if any is inf/NaN.
    One launch per dtype (torch's AMP op), no host sync."""
    op = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)
    if op is not None:
        op(grads, found_inf, inv_scale)
        return
    for g in grads:
        found_inf.copy_(torch.maximum(found_inf, (~torch.isfinite(g)).any().float()))
        g.mul_(inv_scale)


def amp_update_scale_(scale: Tensor, growth_tracker: Tensor, found_inf: Tensor,
                      growth_factor: float, backoff_factor: float,
                      growth_interval: int) -> None:
    """torch.amp.GradScaler's scale update, on the device."""
    op = getattr(torch, "_amp_update_scale_", None)
    if op is not None:
        op(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval)
        return
    bad = found_inf > 0
    grown = growth_tracker + 1
    due = grown >= growth_interval
    scale.copy_(torch.where(bad, scale * backoff_factor,
                            torch.where(due, scale * growth_factor, scale)))
    growth_tracker.copy_(torch.where(bad | due, torch.zeros_like(grown), grown))


# --------------------------------------------------------------------------- fused optimizers

def fused_sgd(device_type: str) -> Callable | None:
    """torch's fused SGD op (`torch._fused_sgd_`) if this torch has it for `device_type`,
    else None (the caller runs the foreach arithmetic)."""
    op = getattr(torch, "_fused_sgd_", None)
    if op is None or not _has_kernel("aten::_fused_sgd_.tensor_lr", device_type):
        return None
    return op


def fused_adam(device_type: str, decoupled: bool) -> Callable | None:
    name = "_fused_adamw_" if decoupled else "_fused_adam_"
    op = getattr(torch, name, None)
    if op is None or not _has_kernel(f"aten::{name}.tensor_lr", device_type):
        return None
    return op


def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cuda": "CUDA", "cpu": "CPU", "meta": "Meta"}.get(device_type, device_type)
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
    except RuntimeError:  # no such operator in this torch
        return False


# --------------------------------------------------------------------------- profiler

def profiler_enabled() -> bool:
    """Whether torch's profiler is recording (a cheap check: fastres' optimizer skips its
    record_function labels otherwise)."""
    check = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)
    return bool(check()) if check is not None else False


# --------------------------------------------------------------------------- compiler

def can_trace_backward() -> bool:
    """Whether Dynamo can trace `loss.backward()` into the graph (torch >= 2.11)."""
    return hasattr(torch._dynamo.config, "trace_autograd_ops")


@contextlib.contextmanager
def tracing_backward():
    """Let Dynamo trace `loss.backward()` into its graph while the body runs (the flag is
    read when Dynamo compiles). Set and restored directly: ~1 us, where
    `torch._dynamo.config.patch` costs ~30-60 us of host time, paid every step."""
    config = torch._dynamo.config
    previous = config.trace_autograd_ops
    config.trace_autograd_ops = True
    try:
        yield
    finally:
        config.trace_autograd_ops = previous


def mark_static_address(t: Tensor) -> None:
    """Tell the compiler `t` keeps its address (CUDA-graph replay may then mutate it in
    place); a no-op where torch has no such marker (graphs then re-record on mutation)."""
    mark = getattr(torch._dynamo, "mark_static_address", None)
    if mark is not None:
        mark(t)


def allow_retained_backward() -> None:
    """Let AOTAutograd run a backward on a retained graph (timing the backward alone): it
    refuses when it donates saved buffers to the backward, a memory optimisation, not a
    speed one. Process-wide; for benchmarks only, set before anything is compiled."""
    try:
        from torch._functorch import config as functorch_config
    except ImportError:
        return
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


def reset_compiler() -> None:
    """Forget every compiled graph and Dynamo's counters (each measurement compiles from
    scratch, as a fresh process would)."""
    torch._dynamo.reset()
    compile_counters().clear()


def compile_counters():
    """Dynamo's event counters (graph breaks by reason, unique graphs)."""
    from torch._dynamo.utils import counters

    return counters


def recompile_reasons() -> list[str]:
    """Why Dynamo recompiled since its last reset: the failed guard of each recompile
    (empty where this torch keeps no record)."""
    try:
        from torch._dynamo.utils import guard_failures
    except ImportError:
        return []
    return [str(reason) for reasons in guard_failures.values() for reason in reasons]


# --------------------------------------------------------------------------- tracing a GPU step on a CPU
#
# `fastres.engine.compile.check_graph(as_device="cuda")` uses torch's fake tensors and
# Inductor's lowering directly; these are torch internals with no public equivalent, so
# the check is only as stable as they are (written against torch 2.11-2.14).

def fake_mode():
    """A FakeTensorMode that accepts real constants (a resumed frame's Python scalars)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def recording_fallbacks(missing: list[str]):
    """Record every op that fake tensors could only run by calling its real kernel (no fake
    or meta implementation) into `missing`. On a CPU stand-in the real CPU kernel then
    runs, so tracing goes on and every such op is found; a GPU compile fails on them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    original = FakeTensorMode.can_run_unsafe_fallback

    def recording(self, func):
        missing.append(str(func))
        return original(self, func)

    FakeTensorMode.can_run_unsafe_fallback = recording
    try:
        yield
    finally:
        FakeTensorMode.can_run_unsafe_fallback = original


def capture_backend(captured: list, cudagraph_problems: list[str] | None):
    """A torch.compile backend that runs AOTAutograd with Inductor's decompositions and
    partitioner and keeps each forward and backward graph (`captured` gets
    (name, graph module, example inputs)); the graphs then run as plain FX code on the fake
    tensors. With `cudagraph_problems`, mutated graph inputs that are not marked static
    (which a CUDA-graph replay could not update in place) are reported there."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    def keep(name):
        def compiler(gm, example_inputs):
            captured.append((name, gm, list(example_inputs)))
            if name == "forward" and cudagraph_problems is not None:
                ctx = torch._guards.TracingContext.try_get()
                meta = getattr(ctx, "fw_metadata", None)
                if meta is not None:
                    static = set(meta.static_input_indices)
                    bad = [i for i, info in enumerate(meta.input_info)
                           if info.mutates_data and i not in static]
                    if bad:
                        cudagraph_problems.append(
                            f"{len(bad)} mutated input(s) not marked static (a CUDA graph "
                            f"would re-record): input indices {bad[:8]}")
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                        decompositions=select_decomp_table(),
                        partition_fn=min_cut_rematerialization_partition)


# H100 SXM's properties (an H200 has the same SM count and compute capability): what
# Inductor reads to pick tiles and split reductions.
SM90_PROPERTIES = dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0,
                       multi_processor_count=132, total_memory=80 * 2**30,
                       regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                       max_threads_per_block=1024, warp_size=32, L2_cache_size=50 * 2**20,
                       shared_memory_per_block_optin=232448, is_integrated=False,
                       gcnArchName="", uuid="fake-sm90")


@contextlib.contextmanager
def fake_cuda_device(properties: dict = SM90_PROPERTIES):
    """While the body runs, Inductor sees one CUDA device with `properties` and Triton
    targets sm_90, on a machine with no GPU: Dynamo's device interface for "cuda", the
    `torch.cuda` queries Inductor makes, and Triton's target are replaced, then restored.
    Only code generation works this way; nothing can be compiled for or run on it."""
    import types

    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as torch_triton
    from torch._inductor.async_compile import AsyncCompile
    from torch._dynamo import device_interface as di
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    props = types.SimpleNamespace(**properties)
    capability = properties["major"] * 10 + properties["minor"]

    class FakeCudaInterface(di.CudaInterface):
        class Worker(di.CudaInterface.Worker):
            @staticmethod
            def get_device_properties(device=None):
                return props

            @staticmethod
            def current_device():
                return 0

        is_available = staticmethod(lambda: True)
        device_count = staticmethod(lambda: 1)
        current_device = staticmethod(lambda: 0)
        get_device_properties = staticmethod(lambda device=None: props)
        get_compute_capability = staticmethod(lambda device=None: capability)
        is_bf16_supported = staticmethod(lambda including_emulation=False: True)
        synchronize = staticmethod(lambda device=None: None)

    patches = [
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "get_device_properties", lambda device=None: props),
        (torch.cuda, "get_device_capability",
         lambda device=None: (properties["major"], properties["minor"])),
        (torch.cuda, "is_bf16_supported", lambda *a, **k: True),
        (scheduler, "has_triton", lambda: True),
        # Code generation only: no kernel is handed to the compile workers (nor, under
        # TRITON_INTERPRET, loaded here), which would need a CUDA driver.
        (AsyncCompile, "use_process_pool", classmethod(lambda cls: False)),
        (torch_triton, "triton_backend", lambda: make_backend(GPUTarget("cuda", capability, 32))),
        (torch_triton, "triton_hash_with_backend", lambda: f"FAKE-SM{capability}"),
    ]
    saved_interface = di.device_interfaces.get("cuda")
    saved = [(obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name))
             for obj, name, _ in patches]
    di.register_interface_for_device("cuda", FakeCudaInterface)
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        if saved_interface is not None:
            di.register_interface_for_device("cuda", saved_interface)


def lower_for_cuda(gm, example_inputs: list, name: str) -> dict:
    """Lower one captured graph with Inductor for a CUDA device and generate its code
    (`fake_cuda_device`): the graph's inputs and any CPU constants move to fake `cuda:0`
    tensors first. Returns {"graph", "ops", "triton_kernels" (defined), "launches" (kernel
    launches per call), "library_calls" (calls into cuBLAS/cuDNN through Inductor's extern
    kernels or ATen ops it does not generate code for), "aten_fallbacks" (those ATen ops),
    "cudagraph_unsafe" (Inductor's reason, or None)}, or {"graph", "error"} where lowering
    stopped."""
    from torch._inductor.debug import DebugContext
    from torch._inductor.graph import GraphLowering
    from torch._inductor.virtualized import V
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    cuda = torch.device("cuda", 0)
    out = {"graph": name, "ops": sum(n.op == "call_function" for n in gm.graph.nodes)}
    try:
        mode = fake_mode()
        inputs = []
        for t in example_inputs:
            if isinstance(t, torch.Tensor):
                with mode:
                    t = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=cuda,
                                            requires_grad=False)
            inputs.append(t)
        for node in gm.graph.nodes:  # constants made on the stand-in device
            node.args = _to_cuda(node.args, cuda)
            node.kwargs = _to_cuda(node.kwargs, cuda)
        gm.recompile()
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
        with fake_cuda_device():
            graph = GraphLowering(gm, example_inputs=inputs, shape_env=mode.shape_env,
                                  is_backward=name.endswith("backward"))
            with V.set_fake_mode(mode), V.set_graph_handler(graph), \
                    V.set_extern_kernel_nodes([]), V.set_debug_handler(DebugContext()):
                graph.run(*inputs)
                code = graph.codegen()
        source = getattr(code[0], "value", code[0])
    except Exception as e:  # noqa: BLE001 - where lowering stops is the finding
        first = (str(e).strip().splitlines() or [""])[0]
        return {**out, "error": f"{type(e).__name__}: {first[:240]}"}
    call = source[source.find("def call("):]
    out.update(triton_kernels=source.count("async_compile.triton("),
               launches=len(re.findall(r"\.run\(", call)),
               library_calls=len(re.findall(r"extern_kernels\.\w+\(", call)) +
               len(re.findall(r"torch\.ops\.aten\.\w+\.\w+\(", call)),
               aten_fallbacks=sorted(set(re.findall(r"torch\.ops\.aten\.(\w+)", call))),
               cudagraph_unsafe=getattr(graph, "disable_cudagraphs_reason", None))
    return out


def _to_cuda(value, cuda: torch.device):
    if isinstance(value, torch.device) and value.type == "cpu":
        return cuda
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cuda(v, cuda) for v in value)
    if isinstance(value, dict):
        return {k: _to_cuda(v, cuda) for k, v in value.items()}
    return value
