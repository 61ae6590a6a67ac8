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
from layerfuse.cli.settings import add_settings_options, settings_from_args

_STORAGE_PLACEHOLDER = "s3://YOUR-BUCKET/PATH/TO/REPO"


def _run_triton(args: argparse.Namespace) -> int:
    from layerfuse.deploy.manifests import write_manifest
    from layerfuse.deploy.triton_config import TritonOptions
    from layerfuse.deploy.triton_repo import check_siblings, write_triton_model

    options = settings_from_args(TritonOptions, args)
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
    from layerfuse.deploy.triton_config import TritonOptions

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
        "--version", type=int, default=1, help="version folder to write (default 1)"
    )
    add_settings_options(parser, TritonOptions)
    _add_manifest_options(parser)
    parser.add_argument(
        "--json", action="store_true", help="print what was written as JSON on stdout"
    )
    parser.set_defaults(handler=_run_triton)


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
