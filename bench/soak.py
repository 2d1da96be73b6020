"""Load and soak: a sustained, mixed load with injected upstream faults, then an audit.

    make soak       (.venv/bin/python bench/soak.py [--seconds 600] [--rate 40] [--workers 1])

Serves the gateway (local host, SQLite, fresh data folder) in front of the simulator (30 ms
latency, 10 ms between stream chunks) and sends `--rate` requests per second for `--seconds`:
70 % chat, 25 % streamed chat, 5 % embeddings, from 20 users of one app with token limits. Every
15 s the simulator is told to answer the next 12 calls with 429 (Retry-After 300 ms) or the next
4 with 500 (below the circuit's threshold of 5 in a row, so retries, budgets and releases run, not
the circuit: with a longer 500 burst the single backend's circuit opens and most answers are 502).

At the end it checks, and prints PASS/FAIL for each:
- every request that got an answer has exactly one log record (by x-sekisho-request-id);
- the app's tokens-per-day counter equals the tokens in its log records (reserve, settle and
  release add up under load; the run must not cross midnight in the quota time zone);
- no answer other than 200 and the injected faults' documented ones (429 upstream_rate_limited,
  502 upstream_error) — no 500, no timeout;
- memory is flat: peak RSS in the last fifth of the run within 15 % (and 20 MB) of the first fifth;
- the log writer spilled nothing to its fallback sink.
Results go to stdout and bench/results/soak-<UTC time>.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.local.issuer import LocalIssuer  # noqa: E402
from tests.servers import free_port, stop, wait_for_port  # noqa: E402

CHAT = "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
EMBED = "/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21"
EXPECTED_FAULTS = {(429, "upstream_rate_limited"), (502, "upstream_error")}  # what the injected 429s and 500s may become


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the workers, with --workers)."""
    total = 0.0
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    for one in pids:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except FileNotFoundError:
            pass
    return total


async def one_request(session: aiohttp.ClientSession, base: str, token: str, number: int) -> tuple[int, str | None, str | None]:
    kind = random.random()
    user = f"user-{number % 20}"
    headers = {"Authorization": f"Bearer {token}", "x-sekisho-user": user}
    if kind < 0.05:
        url, body = base + EMBED, {"input": f"soak {number}"}
    else:
        url = base + CHAT
        body = {"messages": [{"role": "user", "content": f"soak request {number}"}], "max_tokens": 40, "stream": kind >= 0.75}
    try:
        async with session.post(url, json=body, headers=headers) as response:
            data = await response.read()
            code = None
            if response.status >= 400:
                try:
                    code = json.loads(data)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "unparsable"
            return response.status, response.headers.get("x-sekisho-request-id"), code
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return -1, None, type(exc).__name__


async def run(args) -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="sekisho-soak-"))
    sim_port, port = free_port(), free_port()
    sim = subprocess.Popen([sys.executable, "-m", "shared.local.simulator", "--port", str(sim_port),
                            "--latency-ms", "30", "--chunk-interval-ms", "10"], cwd=ROOT,
                           env={**os.environ, "SEKISHO_SIMULATOR_API_KEY": "soak-key"})  # never on a command line
    wait_for_port(sim_port, sim)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEKISHO_", "AZURE_OPENAI_"))}
    env.update({"AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{sim_port}", "AZURE_OPENAI_API_KEY": "soak-key",
                "SEKISHO_SQLITE_PATH": str(data_dir / "sekisho.db"), "SEKISHO_DEPLOYMENTS": "gpt-4o-mini,text-embedding-3-small"})
    host = subprocess.Popen([sys.executable, "-m", "shared.local.host", "--port", str(port), "--quiet", "--no-seed",
                             "--data-dir", str(data_dir), "--workers", str(args.workers)], cwd=ROOT, env=env)
    wait_for_port(port, host)
    base = f"http://127.0.0.1:{port}"
    issuer = LocalIssuer(data_dir)
    app_id = str(uuid.uuid4())
    admin = issuer.mint("soak-admin", roles=["Sekisho.Admin"], lifetime_seconds=86400)
    token = issuer.mint(app_id, lifetime_seconds=86400)
    results: list[tuple[int, str | None, str | None]] = []
    memory: list[tuple[float, float]] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            policy = {"name": "soak", "settings": {"trust_user_header": True, "app_limits": {"tokens_per_day": 10**9},
                                                   "retry": {"max_attempts": 3, "time_budget_seconds": 2, "base_delay_ms": 100}}}
            async with session.put(f"{base}/sekisho/admin/policies/apps/{app_id}", json=policy, headers={"Authorization": f"Bearer {admin}"}) as r:
                assert r.status == 201, await r.text()
            started = time.monotonic()
            pending: set[asyncio.Task] = set()
            number, next_fault, next_sample = 0, started + 15, started
            while (now := time.monotonic()) - started < args.seconds:
                if now >= next_sample:
                    memory.append((now - started, rss_mb(host.pid)))
                    next_sample += 5
                if now >= next_fault:
                    fault = random.choice([{"status": 429, "count": 12, "retry_after_ms": 300}, {"status": 500, "count": 4}])
                    async with session.post(f"http://127.0.0.1:{sim_port}/_sim/faults", json=fault) as r:
                        await r.read()
                    next_fault += 15
                task = asyncio.create_task(one_request(session, base, token, number))
                task.add_done_callback(lambda t: results.append(t.result()))
                pending.add(task)
                task.add_done_callback(pending.discard)
                number += 1
                await asyncio.sleep(max(0.0, started + number / args.rate - time.monotonic()))
            await asyncio.gather(*pending)
            elapsed = time.monotonic() - started
            await asyncio.sleep(2.0)  # log writer and settlements
            async with session.get(f"{base}/health") as r:
                health = await r.json()
        # Audit from the store itself.
        conn = sqlite3.connect(str(data_dir / "sekisho.db"))
        logged = {row[0]: json.loads(row[1]) for row in conn.execute("SELECT id, doc FROM request_logs WHERE app_id = ?", (app_id,))}
        counters = dict(conn.execute("SELECT counter, used FROM quota_counters WHERE subject = ?", (f"app:{app_id}",)).fetchall())
        conn.close()
    finally:
        stop(host)
        stop(sim)

    statuses = Counter((s, c) for s, _, c in results)
    answered_ids = [i for _, i, _ in results if i]
    missing = [i for i in answered_ids if i not in logged]
    day_key = next((k for k in counters if k.startswith("tpd:")), None)
    tokens_counter = counters.get(day_key, 0)
    tokens_logged = sum((r.get("usage") or {}).get("total_tokens", 0) for r in logged.values())
    unexpected = {k: v for k, v in statuses.items() if k[0] != 200 and k not in EXPECTED_FAULTS}
    fifth = max(1, len(memory) // 5)
    early, late = max(m for _, m in memory[:fifth]), max(m for _, m in memory[-fifth:])
    flat = late <= early * 1.15 or late - early <= 20
    checks = [
        ("every answer has one log record", not missing and len(logged) == len(set(answered_ids)), f"{len(answered_ids)} answers, {len(logged)} records, {len(missing)} missing"),
        ("tokens/day counter equals the logs", tokens_counter == tokens_logged, f"counter {tokens_counter}, logs {tokens_logged}"),
        ("only injected faults besides 200", not unexpected, f"unexpected: {dict(unexpected) or 'none'}"),
        ("memory flat", flat, f"peak RSS first fifth {early:.0f} MB, last fifth {late:.0f} MB"),
        ("nothing spilled from the log writer", health["request_log"]["spilled_to_fallback"] == 0, json.dumps(health["request_log"])),
    ]
    lines = [
        f"# Soak {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — {args.seconds:.0f} s at {args.rate}/s, {args.workers} worker(s)",
        "",
        f"Sent {len(results)} requests in {elapsed:.0f} s ({len(results) / elapsed:.1f}/s). Answers: "
        + ", ".join(f"{s}{' ' + c if c else ''}: {n}" for (s, c), n in sorted(statuses.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))),
        "",
        "| check | result | detail |", "|---|---|---|",
        *(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |" for name, ok, detail in checks),
    ]
    report = "\n".join(lines)
    print(report)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"soak-{datetime.now(timezone.utc):%Y%m%dT%H%M}.md").write_text(report + "\n")
    return 0 if all(ok for _, ok, _ in checks) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--rate", type=float, default=40, help="requests per second")
    parser.add_argument("--workers", type=int, default=1)
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
