"""batchdeck: a live-tuning console for LLM batching.

The package maps the repository's rooms into one namespace: `batchdeck.engine` (the core mechanism,
with the service around it in `batchdeck.engine.service`), `batchdeck.policies`, `batchdeck.presets`
and `batchdeck.console`. `batchdeck.cli` is the command line that wires them together.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("batchdeck")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
