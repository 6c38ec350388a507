"""Drive a real `ped serve` from outside, as a browser or a script would: start it on a free port, wait
for its first sync, send concurrent searches. The load test, the browser test and `make bench-serve`
share these."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    run: Path, gallery: Path, *, extra: Sequence[str] = (), timeout: float = 180.0
) -> tuple[subprocess.Popen, str]:
    """`ped serve` (this interpreter's) on a free port, returned once its first sync is done:
    (process, base URL). Its output is kept for `stop_server`."""
    port = free_port()
    ped = Path(sys.executable).with_name("ped")
    cmd = [str(ped), "serve", "--gallery", str(gallery), "--run", str(run), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ped serve exited with {proc.returncode}: {stop_server(proc)}")
        try:
            if httpx.get(f"{url}/api/info", timeout=2).json()["sync"]["synced"]:
                return proc, url
        except (httpx.HTTPError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.2)
    log = stop_server(proc)
    raise RuntimeError(f"ped serve did not finish its first sync in {timeout:.0f} s: {log}")


def stop_server(proc: subprocess.Popen) -> str:
    """Stop the server (SIGTERM, then SIGKILL) and return everything it printed."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def load(
    url: str, queries: Sequence[str], searches: int, clients: int, top: int = 10
) -> list[tuple[bool, float]]:
    """(succeeded, seconds) of `searches` GET /api/search sent by `clients` concurrent clients, each with
    its own connection, cycling through `queries`. Success: HTTP 200 with a JSON answer for that query."""

    def one_client(n: int, offset: int) -> list[tuple[bool, float]]:
        out = []
        with httpx.Client(base_url=url, timeout=120) as c:
            for i in range(n):
                q = queries[(offset + i * clients) % len(queries)]
                start = time.perf_counter()
                try:
                    r = c.get("/api/search", params={"q": q, "top": top})
                    ok = r.status_code == 200 and r.json()["queries"][0]["query"] == q
                except (httpx.HTTPError, json.JSONDecodeError, KeyError):
                    ok = False
                out.append((ok, time.perf_counter() - start))
        return out

    per = [searches // clients + (i < searches % clients) for i in range(clients)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return [x for part in pool.map(one_client, per, range(clients)) for x in part]
