"""One worker process of `python -m shared.local.host --workers N` (see `_serve_workers` there)."""
from __future__ import annotations

import socket

import uvicorn


def serve_worker(options: dict) -> None:
    """Serve on a listening socket of this worker's own, bound to the shared port with
    SO_REUSEPORT: the kernel spreads new connections over the workers."""
    from .__main__ import worker_app
    from .language_worker import _die_with_parent

    _die_with_parent()
    sock = socket.socket(socket.AF_INET6 if ":" in options["host"] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((options["host"], options["port"]))
    sock.listen(2048)
    uvicorn.Server(uvicorn.Config(worker_app(), **options)).run(sockets=[sock])
