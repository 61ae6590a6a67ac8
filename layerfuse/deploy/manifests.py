"""Scale-out as a file: a KServe ``InferenceService`` that runs Triton on a model repository.

KServe ships the ``kserve-tritonserver`` ClusterServingRuntime (model format ``triton``,
protocol v2); it starts ``tritonserver --model-store=/mnt/models`` after copying
``storageUri`` there. So ``storageUri`` names a copy of the repository *root* (the folder
holding ``NAME/config.pbtxt``), never one model folder, and every model in it is served. The
manifest is derived from the repository as it is on disk: its size sets the memory request,
a ``KIND_GPU`` instance group asks for a GPU, and Python-backend models get a note about the
environment their stub needs.
"""

from __future__ import annotations

__all__ = ["MANIFEST_NAME", "inference_service", "service_name", "write_manifest"]

import math
import os
import re
from pathlib import Path

from layerfuse.deploy.triton_config import parse_config
from layerfuse.deploy.triton_repo import CONFIG, read_repository
from layerfuse.files import write_text_atomic

MANIFEST_NAME = "inferenceservice.yaml"
DEFAULT_RUNTIME_VERSION = "24.10-py3"
_GIB = 1024**3


def service_name(text: str) -> str:
    """A Kubernetes resource name (DNS-1123 label) made from a folder name."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not name or not name[0].isalpha():
        name = f"layerfuse-{name}".strip("-")[:63].strip("-")
    return name


def _repo_bytes(repo: Path) -> int:
    return sum(
        path.stat().st_size
        for path in repo.rglob("*")
        if path.is_file() and not path.name.startswith(".")
    )


def inference_service(
    repo: str | os.PathLike,
    *,
    storage_uri: str,
    name: str | None = None,
    runtime_version: str = DEFAULT_RUNTIME_VERSION,
) -> dict:
    """The InferenceService document for the repository at ``repo``."""
    repo = Path(repo)
    entries = read_repository(repo)
    configs = [parse_config(entry.directory / CONFIG) for entry in entries]
    gpu = any(group.kind == group.KIND_GPU for c in configs for group in c.instance_group)
    # Weights are read into memory once per instance; twice the files plus 1 GiB of headroom
    # is a starting point to tune, not a measurement.
    instances = max(sum(g.count or 1 for g in c.instance_group) for c in configs)
    memory = math.ceil((instances * _repo_bytes(repo) * 2 + _GIB) / _GIB)
    resources = {
        "requests": {"cpu": "1", "memory": f"{memory}Gi"},
        "limits": {"cpu": "2", "memory": f"{memory}Gi"},
    }
    if gpu:
        resources["limits"]["nvidia.com/gpu"] = "1"
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": service_name(name or repo.resolve().name),
            "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment"},
        },
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "triton", "version": "2"},
                    "runtime": "kserve-tritonserver",
                    "runtimeVersion": runtime_version,
                    "protocolVersion": "v2",
                    "storageUri": storage_uri,
                    "args": ["--strict-readiness=true", "--exit-timeout-secs=30"],
                    "env": [{"name": "MALLOC_MMAP_THRESHOLD_", "value": "131072"}],
                    "ports": [{"name": "h1", "containerPort": 8080, "protocol": "TCP"}],
                    "resources": resources,
                }
            }
        },
    }


def _notes(repo: Path, backends: set[str]) -> list[str]:
    notes = [
        f"KServe InferenceService for the Triton model repository {repo} (layerfuse deploy).",
        "storageUri: a copy of the repository ROOT (the folder holding NAME/config.pbtxt);",
        "KServe copies it to /mnt/models and starts tritonserver --model-store=/mnt/models.",
        "runtimeVersion is the tritonserver image tag; its onnxruntime must be >= 1.21 for a",
        "tied weight to keep one pre-packed copy (older ones pack it once per MatMul).",
        "MALLOC_MMAP_THRESHOLD_ returns the buffers pre-packing frees to the system.",
        "For gRPC instead of HTTP use ports: [{name: h2c, containerPort: 9000}].",
        "Apply with: kubectl apply -f inferenceservice.yaml",
    ]
    if "python" in backends:
        notes += [
            "Python-backend models need numpy<2 and onnxruntime in the stub: deploy them with",
            "--python-env (EXECUTION_ENV_PATH, e.g. a conda-pack tarball) or use an image that",
            "has both; the onnxruntime backend needs neither.",
        ]
    return notes


def write_manifest(
    repo: str | os.PathLike,
    *,
    storage_uri: str,
    name: str | None = None,
    runtime_version: str = DEFAULT_RUNTIME_VERSION,
) -> Path:
    """Write ``REPO/inferenceservice.yaml`` (Triton ignores files at the repository root)."""
    import yaml

    repo = Path(repo)
    document = inference_service(
        repo, storage_uri=storage_uri, name=name, runtime_version=runtime_version
    )
    backends = {entry.backend for entry in read_repository(repo)}
    header = "".join(f"# {line}\n" for line in _notes(repo, backends))
    return write_text_atomic(
        repo / MANIFEST_NAME, header + yaml.safe_dump(document, sort_keys=False)
    )
