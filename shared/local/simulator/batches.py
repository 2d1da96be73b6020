"""Batches in the simulator: Azure's lifecycle, compressed into seconds.

A batch is `validating` for the first tenth of its run, `in_progress` until its end, then
`completed` with an output file (one line per request that succeeded, each answer with its usage,
exactly what the same request would get on its own) and an error file (requests the simulator
refused: an unknown deployment, a bad body). `cancel` makes it `cancelling`, and at the next read
`cancelled`, with the lines done by then in its output file. A run lasts `SimulatorConfig.
batch_seconds`, or the seconds a batch's metadata names in `x_sim_seconds`; `x_sim_expire`
in the metadata makes it end `expired` with no output.
"""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from .app import Simulator

_ENDPOINTS = {"/chat/completions": "chat/completions", "/v1/chat/completions": "chat/completions", "/embeddings": "embeddings",
              "/v1/embeddings": "embeddings", "/responses": "responses", "/v1/responses": "responses"}
_TERMINAL = ("completed", "failed", "cancelled", "expired")


class SimulatedBatches:
    def __init__(self, simulator: "Simulator", seconds: float) -> None:
        self._simulator = simulator
        self._seconds = seconds
        self.batches: dict[str, dict[str, Any]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        simulator = self._simulator
        if not simulator._authorized(request):
            return simulator._error(401, "401", "Access denied due to invalid subscription key or wrong API endpoint.")
        simulator._record(request, None, 200)
        batch_id = request.match_info.get("batch_id")
        if batch_id is None:
            if request.method == "GET":
                data = [await self._current(request, b) for b in self.batches.values()]
                return web.json_response({"object": "list", "data": data, "has_more": False})
            return await self._create(request)
        batch = self.batches.get(batch_id)
        if batch is None:
            return simulator._error(404, "not_found", f"Batch with id '{batch_id}' not found.")
        if request.match_info.get("what") == "cancel":
            if batch["object"]["status"] in _TERMINAL:
                return simulator._error(409, "invalid_request_error", f"Cannot cancel a batch with status {batch['object']['status']}.")
            batch["object"].update(status="cancelling", cancelling_at=int(time.time()))
            batch["cancel_at"] = time.monotonic()
            return web.json_response(batch["object"])
        return web.json_response(await self._current(request, batch))

    async def _create(self, request: web.Request) -> web.Response:
        simulator = self._simulator
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return simulator._error(400, "invalid_request_error", "We could not parse the JSON body of your request.")
        stored = simulator.files_stored.get(body.get("input_file_id") or "")
        if stored is None:
            return simulator._error(404, "not_found", f"File with id '{body.get('input_file_id')}' not found.")
        if stored["object"]["purpose"] != "batch" or body.get("endpoint") not in _ENDPOINTS:
            return simulator._error(400, "invalid_request_error", "The input file must have purpose 'batch', and the endpoint be a batch endpoint.")
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
        now = int(time.time())
        batch_id = "batch_" + uuid.uuid4().hex
        obj = {
            "id": batch_id, "object": "batch", "endpoint": body["endpoint"], "errors": None, "input_file_id": body["input_file_id"],
            "completion_window": body.get("completion_window", "24h"), "status": "validating", "output_file_id": None,
            "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None,
            "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata or None,
        }
        seconds = float(metadata.get("x_sim_seconds", self._seconds))
        self.batches[batch_id] = {"object": obj, "started": time.monotonic(), "seconds": seconds, "cancel_at": None,
                                  "expire": "x_sim_expire" in metadata, "lines": stored["content"].splitlines()}
        return web.json_response(obj)

    async def _current(self, request: web.Request, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch as it stands now, moved along its lifecycle by the time that passed."""
        obj = batch["object"]
        if obj["status"] in _TERMINAL:
            return obj
        elapsed = time.monotonic() - batch["started"]
        now = int(time.time())
        if batch["cancel_at"] is not None:
            done = self._share_done(batch, batch["cancel_at"] - batch["started"])
            await self._finish(request, batch, "cancelled", done)
            obj["cancelled_at"] = now
        elif elapsed >= batch["seconds"]:
            if batch["expire"]:
                obj.update(status="expired", expired_at=now)
            else:
                await self._finish(request, batch, "completed", len([raw for raw in batch["lines"] if raw.strip()]))
                obj["completed_at"] = now
        elif elapsed >= batch["seconds"] / 10:
            obj.update(status="in_progress", in_progress_at=obj["in_progress_at"] or now)
            obj["request_counts"]["total"] = len([raw for raw in batch["lines"] if raw.strip()])
        return obj

    @staticmethod
    def _share_done(batch: dict[str, Any], elapsed: float) -> int:
        total = len([raw for raw in batch["lines"] if raw.strip()])
        running = max(0.0, elapsed - batch["seconds"] / 10)
        return min(total, int(total * running / (batch["seconds"] * 0.9))) if batch["seconds"] > 0 else total

    async def _finish(self, request: web.Request, batch: dict[str, Any], status: str, lines_done: int) -> None:
        outputs, failures = [], []
        for raw in [raw for raw in batch["lines"] if raw.strip()][:lines_done]:
            line = orjson.loads(raw)
            status_code, answer = await self._run_line(request, line)
            item = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": line.get("custom_id"),
                    "response": {"status_code": status_code, "request_id": str(uuid.uuid4()), "body": answer}, "error": None}
            (outputs if status_code == 200 else failures).append(item)
        obj = batch["object"]
        obj.update(status=status, finalizing_at=int(time.time()),
                   output_file_id=self._file(outputs, "batch_output") if outputs else None,
                   error_file_id=self._file(failures, "batch_output") if failures else None)
        obj["request_counts"] = {"total": len([raw for raw in batch["lines"] if raw.strip()]), "completed": len(outputs), "failed": len(failures)}

    async def _run_line(self, request: web.Request, line: dict[str, Any]) -> tuple[int, Any]:
        """The answer the same request would get on its own."""
        simulator = self._simulator
        operation = _ENDPOINTS.get(line.get("url"))
        body = line.get("body") if isinstance(line.get("body"), dict) else {}
        deployment = body.get("model")
        kinds = {"chat/completions": simulator.config.chat_deployments, "responses": simulator.config.chat_deployments,
                 "embeddings": simulator.config.embedding_deployments}
        if operation is None or deployment not in kinds[operation]:
            return 404, {"error": {"code": "DeploymentNotFound", "message": f"The API deployment {deployment} for this resource does not exist."}}
        handler = {"chat/completions": simulator._chat, "embeddings": simulator._embeddings, "responses": simulator._responses}[operation]
        controls = body.get("x_sim") if isinstance(body.get("x_sim"), dict) else {}
        response = await handler(request, deployment, {**body, "stream": False}, controls, str(uuid.uuid4()))
        return response.status, orjson.loads(response.body)

    def _file(self, lines: list[dict[str, Any]], purpose: str) -> str:
        content = b"".join(orjson.dumps(line) + b"\n" for line in lines)
        file_id = "file-" + uuid.uuid4().hex
        self._simulator.files_stored[file_id] = {"content": content, "object": {
            "id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()), "filename": "batch_output.jsonl",
            "purpose": purpose, "status": "processed", "status_details": None}}
        return file_id
