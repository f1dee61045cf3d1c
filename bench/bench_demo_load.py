"""Load benchmark of the web demo: N Generate requests from C concurrent clients on loopback.

Starts `latentlab demo` on a free 127.0.0.1 port, sends 10 requests from one client alone, then the N
requests through Gradio's HTTP API (each one also fetches the grid image it gets back, as a browser
would), and prints latency percentiles and the server's resident memory before and after. Every request
must succeed (exit status 1 otherwise). Traffic goes to 127.0.0.1 only; the request count is fixed and
every call has a timeout.

    python bench/bench_demo_load.py --run DIR [--requests 200] [--clients 8] [--count 64]
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process in MiB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def generate(base: str, digit: str, count: int, seed: int, timeout: float = 60.0) -> float:
    """One Generate through the HTTP API, then fetch the grid it returns; returns the seconds it took."""
    start = time.perf_counter()
    call = base + "/gradio_api/call/generate"
    request = urllib.request.Request(call, data=json.dumps({"data": [digit, count, seed]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        event_id = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{call}/{event_id}", timeout=timeout) as r:
        stream = r.read().decode()
    last_event = stream.strip().split("event: ")[-1]
    kind, _, data = last_event.partition("\ndata: ")
    if kind != "complete":
        raise RuntimeError(f"server answered {kind}: {data[:200]}")
    picture = json.loads(data)[0]
    with urllib.request.urlopen(picture["url"], timeout=timeout) as r:
        if r.read(8) != b"\x89PNG\r\n\x1a\n":
            raise RuntimeError("the grid is not a PNG")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run folder")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--count", type=int, default=64, help="digits per Generate (1-64)")
    args = parser.parse_args()

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "latentlab", "demo", "--run", args.run, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in server.stdout:
            if "running at" in line:
                break
        else:
            print("the demo did not start", file=sys.stderr)
            return 1
        threading.Thread(target=lambda: [None for _ in server.stdout], daemon=True).start()
        print(f"server up in {time.perf_counter() - start:.1f} s on 127.0.0.1:{port}")
        base = f"http://127.0.0.1:{port}"
        before, _ = memory_mib(server.pid)
        # one client alone first: what a single visitor waits for a grid
        alone = np.array([generate(base, "3", args.count, 10_000 + i) for i in range(10)]) * 1000
        print(f"one client alone, 10 requests: p50 {np.percentile(alone, 50):.0f} ms, max {alone.max():.0f} ms")

        jobs = [("any" if i % 11 == 10 else str(i % 11), args.count, i) for i in range(args.requests)]
        failures = []

        def one(job):
            try:
                return generate(base, *job)
            except Exception as e:  # count every kind of failure, keep going
                failures.append(f"{job}: {type(e).__name__}: {e}")
                return None

        wall = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            seconds = [s for s in pool.map(one, jobs) if s is not None]
        wall = time.perf_counter() - wall
        after, peak = memory_mib(server.pid)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    ms = np.array(seconds) * 1000
    print(f"{len(seconds)}/{args.requests} Generate requests of {args.count} digits succeeded, "
          f"{args.clients} concurrent clients, {wall:.1f} s wall ({len(seconds) / wall:.1f} requests/s)")
    if len(ms):
        print(f"latency ms: p50 {np.percentile(ms, 50):.0f}  p95 {np.percentile(ms, 95):.0f}  max {ms.max():.0f}")
    print(f"server memory (RSS): {before:.0f} MiB before, {after:.0f} MiB after, peak {peak:.0f} MiB")
    for failure in failures[:10]:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
