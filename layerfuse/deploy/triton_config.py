"""Triton's ``config.pbtxt``: built from the graph's signature, checked against the graph.

The config is a ``ModelConfig`` protobuf message from ``tritonclient`` (the schema Triton
itself parses), written with protobuf's text format, so a misspelled field or enum cannot
reach a server: it fails here, with the field named.

Pre-packing: onnxruntime pre-packs constant MatMul weights by default, and onnxruntime >= 1.21
keeps one packed copy per distinct weight in a session, so a tied weight stays shared. Triton's
onnxruntime backend passes no ``session.*`` entries to onnxruntime (unknown ``parameters`` are
ignored), so the config keeps the default; the onnxruntime inside the Triton image decides
whether ties survive packing. The glibc heap growth that packing leaves behind is removed by
``MALLOC_MMAP_THRESHOLD_=131072`` in the server's environment (``layerfuse serve`` sets it; the
InferenceService manifest sets it for a cluster).
"""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "ORT_BACKEND_PARAMETERS",
    "TritonOptions",
    "build_config",
    "config_problems",
    "model_config_module",
    "parse_config",
    "render_config",
]

from dataclasses import dataclass
from pathlib import Path

from layerfuse.deploy.signature import Signature, triton_type
from layerfuse.errors import LayerfuseError
from layerfuse.options import check_options, option

BACKENDS = ("onnxruntime", "python")
# The only ``parameters`` keys Triton's onnxruntime backend reads (onnxruntime_backend
# src/onnxruntime.cc); anything else is silently ignored, so the validator flags it.
ORT_BACKEND_PARAMETERS = frozenset(
    {
        "intra_op_thread_count",
        "inter_op_thread_count",
        "execution_mode",
        "enable_mem_arena",
        "enable_mem_pattern",
        "memory.enable_memory_arena_shrinkage",
        "session.use_device_allocator_for_initializers",
        "cudnn_conv_algo_search",
        "gpu_mem_limit",
        "arena_extend_strategy",
        "do_copy_in_default_stream",
        "cudnn_conv_use_max_workspace",
        "use_ep_level_unified_stream",
    }
)


@dataclass(frozen=True)
class TritonOptions:
    """How one model is served; every field maps to one ``config.pbtxt`` setting."""

    backend: str = option(
        "onnxruntime",
        "onnxruntime: Triton's onnxruntime backend (production images); python: a model.py "
        "that runs the graph in onnxruntime, which any Triton loads, the one `layerfuse "
        "serve` bundles included",
        choices=BACKENDS,
    )
    max_batch_size: int = option(
        8,
        "largest batch Triton's dynamic batcher forms; 0 turns batching off; graphs without "
        "an open first dimension get 0",
    )
    batch_delay_us: int = option(500, "microseconds a request may wait for others to batch with")
    instances: int = option(1, "model instances per device", positive=True)
    device: str = option("cpu", "instance group kind: KIND_CPU or KIND_GPU", choices=("cpu", "gpu"))
    threads: int = option(
        0, "onnxruntime intra-op threads per instance; 0 leaves onnxruntime's default"
    )
    max_input_elements: int = option(
        16384, "python backend: refuse a request input with more elements"
    )
    python_env: str | None = option(
        None,
        "python backend: EXECUTION_ENV_PATH for the stub, an environment (folder or "
        "conda-pack tarball) with numpy<2 and onnxruntime, as the server will see it",
    )

    def __post_init__(self) -> None:
        check_options(self)


def model_config_module():
    """``tritonclient``'s ModelConfig schema, or one line telling how to install it."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise LayerfuseError(
            "writing Triton configs needs tritonclient: pip install 'layerfuse[serve]'"
        ) from None
    return model_config_pb2


def build_config(name: str, signature: Signature, options: TritonOptions):
    """The ``ModelConfig`` for ``signature`` served under ``name`` with ``options``."""
    mc = model_config_module()
    batch = options.max_batch_size if signature.batchable else 0
    config = mc.ModelConfig(name=name, backend=options.backend, max_batch_size=batch)
    for field, specs in ((config.input, signature.inputs), (config.output, signature.outputs)):
        for spec in specs:
            field.add(
                name=spec.name,
                data_type=mc.DataType.Value(triton_type(spec.datatype)),
                dims=spec.shape[1:] if batch else spec.shape,
            )
    if batch:
        config.dynamic_batching.max_queue_delay_microseconds = options.batch_delay_us
    kind = (
        mc.ModelInstanceGroup.KIND_GPU
        if options.device == "gpu"
        else (mc.ModelInstanceGroup.KIND_CPU)
    )
    config.instance_group.add(count=options.instances, kind=kind)
    if options.threads:
        config.parameters["intra_op_thread_count"].string_value = str(options.threads)
        config.parameters["inter_op_thread_count"].string_value = "1"
    if options.backend == "onnxruntime":
        config.default_model_filename = "model.onnx"
    else:
        config.parameters["max_input_elements"].string_value = str(options.max_input_elements)
        if options.python_env:
            config.parameters["EXECUTION_ENV_PATH"].string_value = options.python_env
    return config


def render_config(config, source: str) -> str:
    """Protobuf text format with a header saying where it came from and what it relies on."""
    from google.protobuf import text_format

    header = [
        f"# Written by layerfuse from {source}.",
        "# Pre-packing stays on (onnxruntime's default). Triton's onnxruntime backend ignores",
        "# session.* parameters; onnxruntime >= 1.21 keeps one packed copy of a tied weight.",
        "# Run the server with MALLOC_MMAP_THRESHOLD_=131072 so freed packing buffers leave RSS.",
    ]
    if config.backend == "python":
        header.append(
            "# Python backend: the stub needs numpy<2 and onnxruntime (EXECUTION_ENV_PATH, or"
        )
        header.append("# LAYERFUSE_TRITON_SITE as set by `layerfuse serve`).")
    return "\n".join(header) + "\n" + text_format.MessageToString(config)


def parse_config(path: Path):
    """Parse a ``config.pbtxt``; a syntax error, unknown field or bad enum is one line."""
    from google.protobuf import text_format

    mc = model_config_module()
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise LayerfuseError(f"{path}: not a valid Triton model config ({exc})") from None


def _tensor_problems(config, signature: Signature) -> list[str]:
    mc = model_config_module()
    batch = [-1] if config.max_batch_size > 0 else []
    graph = {spec.name: spec for spec in (*signature.inputs, *signature.outputs)}
    problems = []
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for tensor in tensors:
            spec = graph.get(tensor.name)
            if spec is None:
                problems.append(f"{kind} '{tensor.name}' is not a {kind} of the graph")
                continue
            declared = mc.DataType.Name(tensor.data_type)
            if declared != triton_type(spec.datatype):
                problems.append(
                    f"{kind} '{tensor.name}' is {declared}, the graph has "
                    f"{triton_type(spec.datatype)}"
                )
            dims = [*batch, *tensor.dims]
            if len(dims) != len(spec.shape) or any(
                g != -1 and d != g for g, d in zip(spec.shape, dims, strict=True)
            ):
                problems.append(
                    f"{kind} '{tensor.name}' has dims {dims} (batch included), the graph "
                    f"has {list(spec.shape)}"
                )
    declared_inputs = {tensor.name for tensor in config.input}
    problems += [
        f"graph input '{spec.name}' is missing from the config"
        for spec in signature.inputs
        if spec.name not in declared_inputs
    ]
    return problems


def config_problems(config, signature: Signature, directory_name: str) -> list[str]:
    """Everything in ``config`` that disagrees with the graph or that Triton would ignore."""
    problems = []
    if config.name and config.name != directory_name:
        problems.append(f"config name '{config.name}' differs from its folder '{directory_name}'")
    if config.backend not in BACKENDS:
        problems.append(f"backend '{config.backend}' is not one of {', '.join(BACKENDS)}")
    if config.max_batch_size > 0 and not signature.batchable:
        problems.append(
            "max_batch_size > 0 needs an open first dimension on every input and output"
        )
    problems += _tensor_problems(config, signature)
    if config.backend == "onnxruntime":
        ignored = sorted(set(config.parameters) - ORT_BACKEND_PARAMETERS)
        if ignored:
            problems.append(f"parameters {ignored} are ignored by Triton's onnxruntime backend")
    return problems
