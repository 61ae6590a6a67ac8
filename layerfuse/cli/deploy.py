"""``layerfuse deploy triton``: an ONNX model -> a checked Triton model repository entry.

Also (re)writes the repository's KServe InferenceService manifest, so the same folder can be
served on one machine (``layerfuse serve REPO``) or in a cluster (``kubectl apply``).
"""

from __future__ import annotations

__all__ = ["register"]

import argparse
import json
import shutil
from pathlib import Path

from layerfuse.cli.common import console, model_file

_STORAGE_PLACEHOLDER = "s3://YOUR-BUCKET/PATH/TO/REPO"


def _run_triton(args: argparse.Namespace) -> int:
    from layerfuse.deploy.manifests import write_manifest
    from layerfuse.deploy.triton_config import TritonOptions
    from layerfuse.deploy.triton_repo import check_siblings, write_triton_model

    options = TritonOptions(
        backend=args.backend,
        max_batch_size=args.max_batch_size,
        batch_delay_us=args.batch_delay_us,
        instances=args.instances,
        device=args.device,
        threads=args.threads,
        max_input_elements=args.max_input_elements,
        python_env=args.python_env,
    )
    check_siblings(args.repo)
    folder, signature = write_triton_model(
        args.model, args.repo, args.name, options, version=args.version
    )
    try:
        manifest = write_manifest(
            args.repo,
            storage_uri=args.storage_uri,
            name=args.service_name,
            runtime_version=args.runtime_version,
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # all or nothing: no entry without manifest
        raise
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(folder),
                    "backend": args.backend,
                    "inputs": [spec.to_json() for spec in signature.inputs],
                    "outputs": [spec.to_json() for spec in signature.outputs],
                    "manifest": str(manifest),
                },
                indent=2,
            )
        )
        return 0
    out = console()
    out.print(f"wrote {folder} (Triton {args.backend} backend, checked against the graph)")
    for kind, specs in (("input ", signature.inputs), ("output", signature.outputs)):
        for spec in specs:
            out.print(f"  {kind} {spec.name}: {spec.datatype} {list(spec.shape)}")
    out.print(f"wrote {manifest} (KServe InferenceService for the whole repository)")
    if args.storage_uri == _STORAGE_PLACEHOLDER:
        out.print("  set --storage-uri to where the repository will be copied for the cluster")
    return 0


def _add_triton(commands) -> None:
    parser = commands.add_parser(
        "triton",
        help="write a Triton model repository entry (config.pbtxt from the graph)",
        description="Write REPO/NAME (config.pbtxt + 1/model.onnx and its weights), check it "
        "against the graph, and write REPO/inferenceservice.yaml.",
    )
    parser.add_argument("model", type=model_file, help="the .onnx file to deploy")
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder")
    parser.add_argument("--name", required=True, help="model name (the folder REPO/NAME)")
    parser.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "python"],
        help="onnxruntime: Triton's onnxruntime backend (production images); python: a "
        "model.py that runs the graph in onnxruntime, which any Triton loads, the one "
        "`layerfuse serve` bundles included (default onnxruntime)",
    )
    parser.add_argument(
        "--version", type=int, default=1, help="version folder to write (default 1)"
    )
    _add_instance_options(parser)
    _add_manifest_options(parser)
    parser.add_argument(
        "--json", action="store_true", help="print what was written as JSON on stdout"
    )
    parser.set_defaults(handler=_run_triton)


def _add_instance_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="largest batch Triton's dynamic batcher forms; 0 turns batching off; "
        "graphs without an open first dimension get 0 (default 8)",
    )
    parser.add_argument(
        "--batch-delay-us",
        type=int,
        default=500,
        help="microseconds a request may wait for others to batch with (default 500)",
    )
    parser.add_argument(
        "--instances", type=int, default=1, help="model instances per device (default 1)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "gpu"],
        help="instance group kind: KIND_CPU or KIND_GPU (default cpu)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads per instance; 0 leaves onnxruntime's default "
        "(default 0)",
    )
    parser.add_argument(
        "--max-input-elements",
        type=int,
        default=16384,
        help="python backend: refuse a request input with more elements (default 16384)",
    )
    parser.add_argument(
        "--python-env",
        help="python backend: EXECUTION_ENV_PATH for the stub, an environment (folder or "
        "conda-pack tarball) with numpy<2 and onnxruntime, as the server will see it",
    )


def _add_manifest_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-uri",
        default=_STORAGE_PLACEHOLDER,
        help="where the cluster finds a copy of the repository root, for the manifest "
        "(s3://, gs://, pvc://...)",
    )
    parser.add_argument(
        "--service-name",
        help="InferenceService name (default: the repository folder's name)",
    )
    parser.add_argument(
        "--runtime-version",
        default="24.10-py3",
        help="tritonserver image tag for KServe's kserve-tritonserver runtime "
        "(default 24.10-py3, Triton 2.51 like the bundled server)",
    )


def register(commands) -> None:
    parser = commands.add_parser(
        "deploy", help="write what an inference server needs to serve a model"
    )
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    _add_triton(targets)
