"""Profile Sekisho's request path under load with py-spy (sampling; the gateway runs unmodified).

    .venv/bin/python bench/profile_gateway.py [--app full|min|quota|cache|guards|500] [--seconds 20] [--concurrency 64]

Starts the simulator and the local host exactly as bench/gateway_vs_direct.py does, drives the
chosen app with wrk (unique bodies, so every cache lookup misses), samples the gateway process
with `py-spy record`, and prints where its time goes: per thread, per function (self and
inclusive), and per Sekisho function. The collapsed stacks are written to bench/results/ (open
them in speedscope or flamegraph.pl). Needs py-spy (`.venv/bin/pip install py-spy`); as root, or with
ptrace allowed.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_vs_direct as bench  # noqa: E402

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short_file(path: str) -> str:
    for marker in ("/site-packages/", "/lib/python3.11/", str(bench.ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def parse(collapsed: Path) -> tuple[int, Counter, Counter, Counter, Counter, Counter]:
    threads, own, inclusive, modules, edges = Counter(), Counter(), Counter(), Counter(), Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        thread = next((f for f in frames if f.startswith("thread ")), "thread ?")
        threads[re.sub(r"\(0x[0-9a-f]+\)\s*", "", thread).strip() or thread] += n
        names = []
        for frame in frames:
            if frame.startswith(("process ", "thread ")):
                continue
            found = FRAME.match(frame)
            names.append(f"{short_file(found['file'])}:{found['func']}" if found else frame)
        if not names:
            continue
        own[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
        # The innermost Sekisho (shared/) frame: which part of the gateway the sample belongs to.
        mine = [name for name in names if name.startswith("shared/")]
        modules[mine[-1] if mine else "(outside shared/: server, event loop, libraries)"] += n
        if mine:
            outer = names[names.index(mine[-1]) + 1] if names.index(mine[-1]) + 1 < len(names) else "(self)"
            edges[f"{mine[-1]}  →  {outer}"] += n
    return total, threads, own, inclusive, modules, edges


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (utime + stime) per thread of the process (Python threads all show as "python"
    to the OS: the main thread is the event loop, the others are the store's and uvloop's)."""
    found: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = "main thread (event loop)" if task.name == str(pid) else f"{comm} thread {task.name}"
        found[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def show(title: str, counter: Counter, total: int, top: int) -> None:
    print(f"\n{title}")
    for name, n in counter.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", choices=("full", "min", "quota", "cache", "guards", "500"), default="full",
                        help="which bench app (see SEKISHO_APPS in gateway_vs_direct.py)")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--process", choices=("worker", "host"), default="worker",
                        help="sample the Python worker process (the app, the runtime, its web server; default) "
                             "or the local host's process (routing and forwarding, as the Functions host does)")
    parser.add_argument("--all-threads", action="store_true",
                        help="sample every non-idle thread (default: only the thread holding the GIL, i.e. Python CPU time)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy is missing: .venv/bin/pip install py-spy")
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="sekisho-profile-"))
    out = bench.BENCH / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    collapsed = out / f"profile-{args.app}-{stamp}.txt"
    processes = []
    try:
        asyncio.run(bench.register_apps(str(work / "bench.db")))
        issuer = bench.LocalIssuer(work)
        simulator, sim_url = bench.start_simulator(work)
        processes.append(simulator)
        gateway, url = bench.start_sekisho(work, sim_url, work / "bench.db")
        processes.append(gateway)
        app_id = bench.SEKISHO_APPS["sekisho" if args.app == "full" else f"sekisho-{args.app}"][0]
        target = bench.Target("sekisho", url + bench.AZURE_CHAT_PATH, {"Authorization": "Bearer " + issuer.mint(app_id, lifetime_seconds=3600)}, gateway)
        run_id = secrets.token_hex(4)
        asyncio.run(bench.sequential(target, [f"{run_id}-warm-{i}" for i in range(200)], stream=False))
        bench.wrk(target, args.concurrency, 2, f"{run_id}-warm")
        # Load for a little longer than the sampling, so every sample is under load.
        load: dict = {}
        thread = threading.Thread(target=lambda: load.update(bench.wrk(target, args.concurrency, args.seconds + 2, f"{run_id}-load")))
        thread.start()
        time.sleep(1)
        sampled = gateway.pid
        if args.process == "worker":
            sampled = next(pid for pid in bench.process_tree(gateway.pid) if bench._is_functions_worker(pid))
        before = thread_cpu(sampled)
        subprocess.run([py_spy, "record", "--pid", str(sampled), "--duration", str(args.seconds), "--rate", str(args.rate),
                        "--threads", "--format", "raw", "--output", str(collapsed)] + ([] if args.all_threads else ["--gil"]),
                       check=True, capture_output=True)
        after = thread_cpu(sampled)
        thread.join()
    finally:
        for process in reversed(processes):
            bench.stop(process)
        shutil.rmtree(work, ignore_errors=True)

    total, threads, own, inclusive, modules, edges = parse(collapsed)
    print(f"\nSekisho ({args.app} app) under wrk c={args.concurrency}: {load.get('rps', 0):,.0f} req/s while sampled "
          f"(py-spy adds overhead); {total:,} samples at {args.rate}/s over {args.seconds} s")
    cpu = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    busy = sum(cpu.values())
    print(f"\nCPU of the {args.process} process while sampled: {busy:.1f} s in {args.seconds} s "
          f"({1000 * busy / max(1, load.get('rps', 1) * args.seconds):.2f} ms per request); per thread:")
    for name, seconds in sorted(cpu.items(), key=lambda item: -item[1]):
        if seconds > 0:
            print(f"  {100 * seconds / busy:5.1f}%  {name}")
    print(f"py-spy mode: {'every non-idle thread' if args.all_threads else 'the thread holding the GIL (Python CPU)'}")
    show("Samples per thread (busy time; idle waits are not sampled):", threads, total, 10)
    show("Self time (the innermost frame):", own, total, args.top)
    show("Inclusive time (frame anywhere on the stack):", inclusive, total, args.top)
    show("Innermost Sekisho frame (shared/) of each sample:", modules, total, args.top)
    show("Innermost Sekisho frame → what it was calling:", edges, total, args.top)
    print(f"\ncollapsed stacks: {collapsed.relative_to(bench.ROOT)} (e.g. speedscope.app, or flamegraph.pl)")


if __name__ == "__main__":
    main()
