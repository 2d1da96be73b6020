"""Hands a stored job to the orchestration: a message on the host storage's `sekisho-jobs`
queue, read by the queue-triggered starter in function_app.py. Locally the local host plays the
queue (SEKISHO_LOCAL_QUEUE_URL, which it sets) and delivers the message to the same starter.
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
    def from_settings(cls, settings: Settings) -> "QueueJobLauncher | LocalQueueJobLauncher | None":
        from azure.storage.queue.aio import QueueClient

        if settings.local_queue_url:
            return LocalQueueJobLauncher(settings.local_queue_url)
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
        await self._queue.send_message(encoded_message(job))

    async def close(self) -> None:
        await self._queue.close()
        if self._credential is not None:
            await self._credential.close()


def encoded_message(job: dict[str, Any]) -> str:
    text = json.dumps(start_message(job), separators=(",", ":"))
    return base64.b64encode(text.encode()).decode()


class LocalQueueJobLauncher:
    """The same message, put on the local host's queue stand-in (`POST {url}/{queue}/messages`)."""

    def __init__(self, url: str) -> None:
        import aiohttp

        self._url = f"{url.rstrip('/')}/{START_QUEUE}/messages"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def launch(self, job: dict[str, Any]) -> None:
        async with self._session.post(self._url, data=encoded_message(job)) as answer:
            if answer.status != 201:
                raise RuntimeError(f"the local queue answered {answer.status}")

    async def close(self) -> None:
        await self._session.close()
