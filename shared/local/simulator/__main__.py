"""Run the simulator: `python -m shared.local.simulator --port 7072`."""
from __future__ import annotations

import argparse
import os

from aiohttp import web

from .app import QUIRKS, SimulatorConfig, build_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Azure OpenAI simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7072)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added before every answer")
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0, help="pause between stream chunks")
    parser.add_argument("--api-key", default=None,
                        help="demand this api-key (Bearer tokens are also accepted); default: SEKISHO_SIMULATOR_API_KEY, which keeps it out of the process list")
    parser.add_argument("--content-safety-latency-ms", type=float, default=0.0, help="added before every Content Safety answer")
    parser.add_argument("--batch-seconds", type=float, default=2.0, help="how long a batch runs before it completes")
    parser.add_argument("--quirks", default="", help="comma-separated, to behave like Azure-compatible servers that are not Azure: " + ", ".join(f"{k} ({v})" for k, v in QUIRKS.items()))
    args = parser.parse_args(argv)
    quirks = frozenset(q.strip() for q in args.quirks.split(",") if q.strip())
    if quirks - set(QUIRKS):
        parser.error(f"unknown quirks: {sorted(quirks - set(QUIRKS))}")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is in requirements
        pass
    api_key = args.api_key or os.environ.get("SEKISHO_SIMULATOR_API_KEY") or None
    config = SimulatorConfig(latency_ms=args.latency_ms, chunk_interval_ms=args.chunk_interval_ms, api_key=api_key, quirks=quirks,
                             batch_seconds=args.batch_seconds, content_safety_latency_ms=args.content_safety_latency_ms)
    web.run_app(build_app(config), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
