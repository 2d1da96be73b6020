"""Hands a stored job to the orchestration: in Azure by a message on the host storage's
`sekisho-jobs` queue (read by the queue-triggered starter in function_app.py); locally the
local host plugs in its in-process Durable runtime instead (shared/local/host/durable_runtime.py).
"""
from __future__ import annotations

import base64
import json
import logging
from typing import Any, Protocol

from ..settings import Settings
from .orchestration import START_QUEUE, start_message

logger = logging.getLogger("sekisho.jobs")


class JobLauncher(Protocol):
    async def launch(self, job: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class QueueJobLauncher:
    """Enqueues the start message with azure-storage-queue. Base64 text, because that is what
    the Functions queue trigger decodes by default (host.json `messageEncoding`)."""

    def __init__(self, queue_client) -> None:
        self._queue = queue_client
        self._credential = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "QueueJobLauncher | None":
        from azure.storage.queue.aio import QueueClient

        if settings.webjobs_storage_account:
            from azure.identity.aio import DefaultAzureCredential

            credential = DefaultAzureCredential(managed_identity_client_id=settings.webjobs_storage_client_id or None)
            url = f"https://{settings.webjobs_storage_account}.queue.core.windows.net"
            launcher = cls(QueueClient(url, START_QUEUE, credential=credential))
            launcher._credential = credential
            return launcher
        if settings.webjobs_storage:
            return cls(QueueClient.from_connection_string(settings.webjobs_storage, START_QUEUE))
        return None

    async def launch(self, job: dict[str, Any]) -> None:
        text = json.dumps(start_message(job), separators=(",", ":"))
        await self._queue.send_message(base64.b64encode(text.encode()).decode())

    async def close(self) -> None:
        await self._queue.close()
        if self._credential is not None:
            await self._credential.close()
