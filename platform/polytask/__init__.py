"""polytask: one pretrained encoder shared by many task heads, trained on Ray Train, swept on Ray
Tune, tracked in MLflow and served on Ray Serve. The layers and their order are in ARCHITECTURE.md."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("polytask")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
