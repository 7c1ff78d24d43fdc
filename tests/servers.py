"""Servers on loopback for the conductor's tests and benchmarks: an app in a thread, a member in a process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerThread:
    """uvicorn on 127.0.0.1 in a daemon thread."""

    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_member_server(
    member: dict[str, Any],
    work_dir: Path,
    max_tokens: int,
    registry_root: Path | None = None,
    startup_s: float = 300,
) -> tuple[subprocess.Popen, str]:
    """`merger serve` of a one-member pool (no trained head needed) in its own process, as another
    conductor's remote member would run; returns (the process, its /v1 URL) once /health answers."""
    pool: dict[str, Any] = {
        "members": [member],
        "server": {"max_tokens": max_tokens},
        "work_dir": str(work_dir),
    }
    if registry_root is not None:
        pool["registry_root"] = str(registry_root)
    pool_file = work_dir / f"{member['name']}-member.yaml"
    pool_file.write_text(yaml.safe_dump(pool))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "merger.cli", "serve", str(pool_file), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + startup_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"merger serve exited: {process.communicate()[1][-2000:]}") from None
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"merger serve did not come up in {startup_s:g} s") from None
            time.sleep(0.2)
