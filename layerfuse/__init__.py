"""layerfuse: merge and fuse feed-forward sublayers of exported transformer models in ONNX."""

__version__ = "0.1.0"
