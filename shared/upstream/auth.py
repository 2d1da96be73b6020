"""How the gateway authenticates to Azure OpenAI: an api-key, or an Entra ID token.

Tokens come from azure-identity's async DefaultAzureCredential (the Function App's managed
identity in Azure, the developer's login locally) and are cached until five minutes before
they expire, so the hot path does not call the identity endpoint.
"""
from __future__ import annotations

import asyncio
import time

COGNITIVE_SERVICES_SCOPE = "https://cognitiveservices.azure.com/.default"
_REFRESH_MARGIN_SECONDS = 300


class ApiKeyAuth:
    def __init__(self, key: str, header: str = "api-key") -> None:
        self._headers = {header: key}

    async def headers(self) -> dict[str, str]:
        return self._headers

    async def close(self) -> None:
        return None


class EntraTokenAuth:
    def __init__(self, credential=None, scope: str = COGNITIVE_SERVICES_SCOPE) -> None:
        self._credential = credential
        self._scope = scope
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock = asyncio.Lock()

    async def headers(self) -> dict[str, str]:
        if self._token is None or time.time() > self._expires_on - _REFRESH_MARGIN_SECONDS:
            async with self._lock:
                if self._token is None or time.time() > self._expires_on - _REFRESH_MARGIN_SECONDS:
                    if self._credential is None:
                        from azure.identity.aio import DefaultAzureCredential

                        self._credential = DefaultAzureCredential()
                    token = await self._credential.get_token(self._scope)
                    self._token, self._expires_on = token.token, float(token.expires_on)
        return {"Authorization": f"Bearer {self._token}"}

    async def close(self) -> None:
        if self._credential is not None and hasattr(self._credential, "close"):
            await self._credential.close()

