"""A built-in Azure OpenAI simulator: the upstream for `make run`, the tests and the benchmarks.

Serves the Azure-style and v1 routes with deterministic replies, realistic usage, Azure's
stream shape (prompt filter chunk, content deltas, usage chunk, [DONE]), embeddings, added
latency, and 429/500 injection. See `app.py` for the controls.
"""
from .app import SimulatorConfig, build_app

__all__ = ["SimulatorConfig", "build_app"]
