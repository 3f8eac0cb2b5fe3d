"""loops-watcher: a Prometheus exporter for Baseten Loops sampler status."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("loops-watcher")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
