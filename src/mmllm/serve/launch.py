"""Starting a server: `serve_from_main_thread` (what `mmllm serve` runs), and for what drives a server
in a process of its own from outside (the benchmarks, the lmms-eval comparison, the tests): a free
port, and the wait until it answers."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

import httpx

GIL_SWITCH_S = 0.0005  # `serve_from_main_thread`'s interpreter switch interval (Python's default: 5 ms)

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from mmllm.engine.batcher import RequestQueue


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(process: subprocess.Popen, url: str, timeout: float) -> None:
    """Return once `url` answers 200. A RuntimeError when the process ends first, or when `timeout`
    seconds pass (the process is killed then): the caller adds the server's log to the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    process.wait()
    raise RuntimeError(f"the server did not answer {url} within {timeout:.0f} s")


def serve_from_main_thread(app: ASGIApp, requests: RequestQueue, host: str, port: int) -> None:
    """Run `app` under uvicorn in a thread of its own while this thread, the process's first, runs the
    model (`requests.serve`, a queue made with thread=False); returns once uvicorn has shut down.

    Why: libgomp (torch's OpenMP) spins between the parallel regions of the first thread's team, but
    once its threads outnumber the cores it throttles the spinning of any other thread's team, which
    then sleeps and wakes at every op. On two cores a 16-row decoding step of SmolLM2-135M takes 26 ms
    from the first thread and 42 ms from a second one. SIGINT and SIGTERM stop uvicorn as they would
    (its own handlers install only from the main thread); the queue then answers what it holds.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    # Hand the GIL over within 0.5 ms, not 5: the model's thread takes it back after every torch op,
    # and waiting out uvicorn's Python for the default interval cost 6-9% of throughput at 16 clients.
    sys.setswitchinterval(GIL_SWITCH_S)

    def http() -> None:
        try:
            server.run()
        finally:
            requests.close()

    def stop(signum: int, frame: object) -> None:
        server.force_exit = server.should_exit  # a second signal: stop waiting for open connections
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    threading.Thread(target=http, name="mmllm-http", daemon=True).start()
    requests.serve()
    if not server.started:  # uvicorn said why (a port in use)
        raise SystemExit(1)
