"""layerfuse: merge, fuse and prune layers of exported transformer models in ONNX.

The public API (``layerfuse.load``, ``layerfuse.plan_merge``, ``Plan.apply``,
``layerfuse.recover_model``, ...) lives in :mod:`layerfuse.api` and is imported on first use, so
``import layerfuse`` (and the CLI's start) does not pay for torch and onnxruntime.

Example::

    import layerfuse

    model = layerfuse.load("smollm2/model.onnx")
    plan = layerfuse.plan_merge(model, ratio="1/3")
    plan.apply(model).save("merged/model.onnx")
"""

__version__ = "0.1.0"

__all__ = [
    "Model",
    "Recovery",
    "__version__",
    "bench",
    "evaluate",
    "load",
    "load_plan",
    "plan_fuse",
    "plan_merge",
    "plan_prune",
    "plan_share_kv",
    "quantize",
    "recover_model",
]


def __getattr__(name: str):
    if name in __all__:
        from layerfuse import api

        return getattr(api, name)
    raise AttributeError(f"module 'layerfuse' has no attribute {name!r}")
