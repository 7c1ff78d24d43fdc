"""Servers on loopback for the conductor's tests and benchmarks: an app in a thread, a member in a process,
fake OpenAI-compatible members that misbehave on command, and a server that closes every connection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from merger.conductor.serving import uvicorn_config
from merger.router.pool import ServerSettings

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerThread:
    """uvicorn on 127.0.0.1 in a daemon thread; with `settings`, configured as `merger serve` configures it
    (header timeout, keep-alive, connection and header-size limits)."""

    def __init__(self, app: FastAPI, settings: ServerSettings | None = None) -> None:
        self.port = free_port()
        if settings is not None:
            config = uvicorn_config(app, settings, "127.0.0.1", self.port)
        else:
            config = uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
            )
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
    return serve_process(pool_file, startup_s)


def serve_process(
    pool_file: Path, startup_s: float = 300, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`merger serve POOL_FILE` on a free loopback port; returns (the process, its /v1 URL) once /health
    answers, or raises with the end of its stderr if it exits or does not come up in time."""
    port = free_port()
    environment = {
        **(os.environ if env is None else env),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    # stderr to a file beside the pool file, not a pipe nobody reads: a full pipe blocks the server's logging
    stderr_path = pool_file.with_suffix(".stderr.log")
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "merger.cli", "serve", str(pool_file), "--port", str(port)],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + startup_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"merger serve exited: {stderr_path.read_text()[-2000:]}") from None
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise RuntimeError(f"merger serve did not come up in {startup_s:g} s") from None
            time.sleep(0.2)


FAKE_MODES = (
    "ok",  # answers "<model> answers" (or the verdict to a verification prompt)
    "fail",  # 500, its message echoing the Authorization header it got
    "stall",  # answers after state["stall_s"] seconds
    "hang",  # never answers; counts in state["disconnected"] the clients that went away
    "rate_limit",  # 429 with Retry-After: state["retry_after"]
    "reject",  # state["reject_status"] (400 by default) with code context_length_exceeded
    "invalid_json",  # 200 with a body that is not JSON
    "trickle",  # the whole answer, one byte every state["trickle_s"] seconds
    "endless",  # a stream that never ends (a chunk every state["endless_s"]); plain: a body that never ends
    "break_before_first",  # a stream that breaks before its first token
    "break_after_first",  # a stream that breaks after its first token
)


def fake_member(model: str, key: str | None = None) -> tuple[FastAPI, dict[str, Any]]:
    """An OpenAI-compatible endpoint that behaves as `state['mode']` says (FAKE_MODES); with `key`, it
    answers 401 to any other bearer key. state counts calls and keeps the prompts and `stop` it got."""
    state: dict[str, Any] = {
        "mode": "ok",
        "calls": 0,
        "verdict": "ACCEPT",
        "prompts": [],
        "stall_s": 3.0,
        "retry_after": "120",
        "reject_status": 400,
        "trickle_s": 0.05,
        "endless_s": 0.01,
        "disconnected": 0,
        "streams_closed": 0,
        "usage_tokens": None,  # completion_tokens to report in a plain answer's usage
    }
    app = FastAPI()

    def chunk(content: str | None, finish: str | None = None) -> str:
        delta = {} if content is None else {"role": "assistant", "content": content}
        body = {
            "id": "x",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body)}\n\n"

    def completion(text: str) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        answer: dict[str, Any] = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        }
        if state["usage_tokens"] is not None:
            used = state["usage_tokens"]
            answer["usage"] = {"prompt_tokens": 1, "completion_tokens": used, "total_tokens": used + 1}
        return answer

    async def wait_for_disconnect(request: Request) -> Response:
        for _ in range(6000):  # at most about 10 minutes
            if await request.is_disconnected():
                state["disconnected"] += 1
                break
            await asyncio.sleep(0.1)
        return Response(status_code=204)

    async def trickled(payload: bytes) -> AsyncIterator[bytes]:
        for byte in payload:
            yield bytes([byte])
            await asyncio.sleep(state["trickle_s"])

    async def endless(streaming: bool) -> AsyncIterator[str]:
        try:
            if not streaming:
                yield '{"id": "x", "choices": [{"message": {"content": "'
            for index in range(10**6):
                yield chunk(f" {index}") if streaming else "x"
                await asyncio.sleep(state["endless_s"])
        finally:
            state["streams_closed"] += 1

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        state["calls"] += 1
        authorization = request.headers.get("authorization", "")
        if key is not None and authorization != f"Bearer {key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        state["prompts"].append(prompt)
        state["stop"] = body.get("stop")
        mode, streaming = state["mode"], bool(body.get("stream"))
        if mode == "fail":
            return JSONResponse(
                {"error": {"message": f"internal failure, request had {authorization}"}}, status_code=500
            )
        if mode == "rate_limit":
            return JSONResponse(
                {"error": {"message": "slow down"}},
                status_code=429,
                headers={"Retry-After": state["retry_after"]},
            )
        if mode == "reject":
            error = {
                "message": "prompt too long",
                "type": "invalid_request_error",
                "code": "context_length_exceeded",
            }
            return JSONResponse({"error": error}, status_code=state["reject_status"])
        if mode == "invalid_json":
            return Response("{not json", media_type="application/json")
        if mode == "hang":
            return await wait_for_disconnect(request)
        if mode == "endless":
            return StreamingResponse(
                endless(streaming), media_type="text/event-stream" if streaming else None
            )
        if mode == "stall":
            await asyncio.sleep(state["stall_s"])
        text = state["verdict"] if "Proposed answer" in prompt else f"{model} answers"
        if not streaming:
            if mode == "trickle":
                return StreamingResponse(
                    trickled(json.dumps(completion(text)).encode()), media_type="application/json"
                )
            return completion(text)

        async def events() -> AsyncIterator[str]:
            try:
                if mode == "break_before_first":
                    raise RuntimeError("stream broken before the first token")
                words = text.split(" ")
                yield chunk(words[0])
                if mode == "break_after_first":
                    raise RuntimeError("stream broken after the first token")
                for word in words[1:]:
                    yield chunk(" " + word)
                yield chunk(None, "stop")
                yield "data: [DONE]\n\n"
            finally:
                state["streams_closed"] += 1

        if mode == "trickle":
            payload = "".join([chunk(word) for word in text.split(" ")] + ["data: [DONE]\n\n"]).encode()
            return StreamingResponse(trickled(payload), media_type="text/event-stream")
        return StreamingResponse(events(), media_type="text/event-stream")

    return app, state


class ClosingServer:
    """A TCP server on 127.0.0.1 that reads a little of each connection and closes it: a member whose
    connections are cut before any answer."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = int(self._socket.getsockname()[1])
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(1)
                with contextlib.suppress(OSError):
                    connection.recv(65536)

    def __enter__(self) -> ClosingServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)
        self._socket.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()
