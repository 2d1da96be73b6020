"""Run the simulator: `python -m shared.local.simulator --port 7072`."""
from __future__ import annotations

import argparse

from aiohttp import web

from .app import SimulatorConfig, build_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Azure OpenAI simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7072)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added before every answer")
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0, help="pause between stream chunks")
    parser.add_argument("--api-key", default=None, help="demand this api-key (Bearer tokens are also accepted)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is in requirements
        pass
    config = SimulatorConfig(latency_ms=args.latency_ms, chunk_interval_ms=args.chunk_interval_ms, api_key=args.api_key)
    web.run_app(build_app(config), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
