"""The machine and library versions a result was measured with (stored in every results JSON)."""

from __future__ import annotations

__all__ = ["environment"]

import os
import platform
from importlib import metadata


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _gpu() -> str | None:
    try:
        import subprocess

        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def environment() -> dict:
    import onnxruntime

    packages = (
        "layerfuse",
        "onnx",
        "onnx-ir",
        "onnxscript",
        "onnxruntime",
        "onnxruntime-gpu",
        "torch",
        "transformers",
        "numpy",
        "scipy",
    )
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_bytes": _memory_bytes(),
            "gpu": _gpu(),
            # Other processes' load during the run: timings taken under load are noisier.
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "python": platform.python_version(),
        "packages": {name: v for name in packages if (v := _version(name)) is not None},
        # The module actually imported: onnxruntime and onnxruntime-gpu can both be installed.
        "onnxruntime_loaded": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
    }
