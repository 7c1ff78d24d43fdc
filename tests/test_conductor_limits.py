"""Conductor hardening over real loopback HTTP (issue 15): deadlines and the token cap, cancellation when the
client leaves, request errors apart from member errors, bad text and size limits, auth that cannot turn off
silently, unsupported fields refused, slow clients bounded, static routing without a head, the OpenAPI
schema. Fake members (tests.servers.fake_member) misbehave on command; no model is loaded."""

from __future__ import annotations

import copy
import email.utils
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import yaml

from merger.common.errors import MergerError
from merger.conductor.app import create_app
from merger.conductor.remote_backend import retry_after_seconds
from merger.conductor.routing import Conductor, build_conductor
from merger.router.embeddings import Embedder, EmbeddingCache
from merger.router.pool import Pool, parse_pool
from tests.servers import REPO, ServerThread, fake_member, serve_process
from tests.test_conductor import ask, ordered_head
from tests.test_conductor import stream_events as stream

NAMES = ("first", "second", "steady")
WAIT_S = 60  # the most any poll below waits for something that must happen; never reached when it works


@dataclass
class Fake:
    server: ServerThread
    state: dict[str, Any]
    defaults: dict[str, Any]

    @property
    def url(self) -> str:
        return self.server.url + "/v1"


@dataclass
class Served:
    thread: ServerThread
    conductor: Conductor
    client: openai.OpenAI

    @property
    def url(self) -> str:
        return self.thread.url

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/health", timeout=30) as response:
            return json.load(response)["members"]


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Fake]]:
    started = {}
    for name in NAMES:
        app, state = fake_member(name)
        started[name] = Fake(ServerThread(app).__enter__(), state, copy.deepcopy(state))
    yield started
    for fake in started.values():
        fake.server.stop()


@pytest.fixture(autouse=True)
def reset_fakes(fakes: dict[str, Fake]) -> None:
    for fake in fakes.values():
        fake.state.clear()
        fake.state.update(copy.deepcopy(fake.defaults))


def pool_data(
    fakes: dict[str, Fake], tmp_path: Path, members: dict[str, dict[str, Any]] | None = None, **server: Any
) -> dict[str, Any]:
    members = members or {name: {} for name in NAMES}
    return {
        "members": [
            {"name": name, "remote": {"base_url": fakes[name].url, "model": name}, **extra}
            for name, extra in members.items()
        ],
        "routing": "static",
        "breaker": {"failures": 2, "window_s": 60, "cooldown_s": 60},
        "server": {
            "max_tokens": 16,
            "timeout_s": 10,
            "first_token_timeout_s": 10,
            "deadline_s": 30,
            **server,
        },
        "work_dir": str(tmp_path / "work"),
    }


@pytest.fixture
def serve(fakes: dict[str, Fake], tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[ServerThread] = []

    def start(
        members: dict[str, dict[str, Any]] | None = None,
        pool_extra: dict[str, Any] | None = None,
        **server: Any,
    ) -> Served:
        pool = parse_pool({**pool_data(fakes, tmp_path, members, **server), **(pool_extra or {})}, tmp_path)
        conductor = build_conductor(pool)
        thread = ServerThread(create_app(conductor), pool.server).__enter__()
        started.append(thread)
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return Served(thread, conductor, client)

    yield start
    for thread in started:
        thread.stop()


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def eventually(condition: Callable[[], bool]) -> bool:
    """Polls `condition` until it holds or WAIT_S pass (a bound, not a timing assertion)."""
    give_up = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.05)
    return True


def body(text: str = "hi", **fields: Any) -> bytes:
    return json.dumps({"model": "merger", "messages": [{"role": "user", "content": text}], **fields}).encode()


# ---- 1. deadlines and the token cap ----


def test_an_endless_stream_is_cut_at_max_tokens_and_counts_against_its_member(
    serve: Callable[..., Served], fakes: dict[str, Fake]
) -> None:
    served = serve()
    fakes["first"].state["mode"] = "endless"
    result = stream(served.client, max_tokens=5)
    assert result["member"] == "first" and len(result["pieces"]) == 5 and result["finish"] == "length"
    assert served.health()["first"]["recent_failures"] == 1
    assert eventually(lambda: fakes["first"].state["streams_closed"] == 1)  # the upstream stream was closed


def test_a_trickling_member_meets_the_deadline_and_the_next_member_answers(
    serve: Callable[..., Served], fakes: dict[str, Fake]
) -> None:
    served = serve(members={"first": {"deadline_s": 1}, "second": {}, "steady": {}})
    fakes["first"].state["mode"] = "trickle"  # a byte every 0.05 s: no read ever times out
    text, merger, member = ask(served.client)
    assert (text, member) == ("second answers", "second")
    assert "1s deadline" in merger["attempts"][0]["outcome"]
    result = stream(served.client)
    assert result["member"] == "second" and "".join(result["pieces"]) == "second answers"
    assert "deadline" in result["merger"]["attempts"][0]["outcome"]
    assert served.health()["first"]["state"] == "open"  # two failures: the breaker counted both


@pytest.mark.slow  # a server and its deadline
def test_an_endless_answer_ends_at_the_deadline_plain_and_after_the_first_token(
    serve: Callable[..., Served], fakes: dict[str, Fake]
) -> None:
    # 3 s: time enough for the first piece even on a busy machine; the rest never ends
    served = serve(members={"first": {"deadline_s": 3}, "second": {}, "steady": {}}, max_tokens=100_000)
    fakes["first"].state["mode"] = "endless"
    text, merger, member = ask(served.client)
    assert member == "second" and "deadline" in merger["attempts"][0]["outcome"]
    with pytest.raises(openai.APIError, match="first broke its stream: stream still open at the 3s deadline"):
        stream(served.client, max_tokens=100_000)


def test_a_plain_answer_longer_than_max_tokens_is_a_member_failure(
    serve: Callable[..., Served], fakes: dict[str, Fake]
) -> None:
    served = serve()
    fakes["first"].state["usage_tokens"] = 500
    fakes["second"].state["usage_tokens"] = 16
    text, merger, member = ask(served.client, max_tokens=16)
    assert (
        member == "second" and "answered 500 tokens, past max_tokens 16" in merger["attempts"][0]["outcome"]
    )


# ---- 2. a client that goes away cancels the member call ----


@pytest.mark.parametrize("streaming", [False, True])
def test_a_client_that_gives_up_cancels_the_member_call_without_blaming_it(
    serve: Callable[..., Served], fakes: dict[str, Fake], streaming: bool
) -> None:
    served = serve()
    fakes["first"].state["mode"] = "hang"
    impatient = served.client.with_options(timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model="merger", messages=[{"role": "user", "content": "hi"}], stream=streaming
        )
    assert eventually(lambda: fakes["first"].state["disconnected"] == 1)
    assert served.health()["first"] == {"state": "closed", "recent_failures": 0}
    assert fakes["second"].state["calls"] == 0  # no fallback for a client that left


def test_a_client_leaving_mid_stream_closes_the_member_stream(
    serve: Callable[..., Served], fakes: dict[str, Fake]
) -> None:
    served = serve(max_tokens=100_000)
    fakes["first"].state.update(mode="endless", endless_s=0.05)
    events = served.client.chat.completions.create(
        model="merger", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=100_000
    )
    for index, _ in enumerate(events):
        if index == 2:
            break
    events.close()
    assert eventually(lambda: fakes["first"].state["streams_closed"] == 1)
    assert served.health()["first"] == {"state": "closed", "recent_failures": 0}


# ---- 3. request errors pass through; member errors fall back ----


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_members_request_error_reaches_the_client_without_fallback_or_breaker(
    serve: Callable[..., Served], fakes: dict[str, Fake], status: int
) -> None:
    served = serve()
    fakes["first"].state.update(mode="reject", reject_status=status)
    for streaming in (False, True, False):
        with pytest.raises(openai.APIStatusError) as raised:
            served.client.chat.completions.create(
                model="merger", messages=[{"role": "user", "content": "long"}], stream=streaming
            )
        assert raised.value.status_code == status
        assert raised.value.body["code"] == "context_length_exceeded"
        assert "member first refused the request: prompt too long" in raised.value.body["message"]
    assert fakes["second"].state["calls"] == 0
    assert served.health()["first"] == {"state": "closed", "recent_failures": 0}


def test_a_rate_limited_member_rests_for_its_retry_after(
    serve: Callable[..., Served], fakes: dict[str, Fake]
) -> None:
    served = serve()  # the breaker opens after 2 failures; a 429 with Retry-After opens it at once
    fakes["first"].state.update(mode="rate_limit", retry_after="120")
    assert ask(served.client)[2] == "second"
    assert served.health()["first"]["state"] == "open"
    _, merger, member = ask(served.client)
    assert member == "second" and merger["attempts"][0] == {
        "member": "first",
        "outcome": "skipped: circuit open",
    }
    assert fakes["first"].state["calls"] == 1


def test_invalid_json_is_a_member_failure(serve: Callable[..., Served], fakes: dict[str, Fake]) -> None:
    served = serve()
    fakes["first"].state["mode"] = "invalid_json"
    assert ask(served.client)[2] == "second"
    assert served.health()["first"]["recent_failures"] == 1


def test_retry_after_in_seconds_milliseconds_or_a_date() -> None:
    assert retry_after_seconds({"retry-after": "7"}) == 7
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 30 < (retry_after_seconds({"retry-after": in_a_minute}) or 0) <= 61
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds({}) is None


# ---- 4. bad text, big bodies, long prompts, routing without a global lock ----


def test_invalid_text_is_a_400_never_a_500(serve: Callable[..., Served]) -> None:
    served = serve()
    status, payload = post(
        served.url, b'{"model": "merger", "messages": [{"role": "user", "content": "a\\ud800"}]}'
    )
    assert status == 400 and "lone surrogate" in payload["error"]["message"]
    status, payload = post(
        served.url, b'{"model": "merger", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    )
    assert status == 400
    assert EmbeddingCache.text_hash("a\ud800") != EmbeddingCache.text_hash("a")  # the cache keys any str


def test_bodies_and_prompts_over_the_limits_get_413(serve: Callable[..., Served]) -> None:
    served = serve(max_body_bytes=2048, max_prompt_chars=100)
    status, payload = post(served.url, body("x" * 3000))
    assert status == 413 and "2,048 bytes" in payload["error"]["message"]
    with socket.create_connection(("127.0.0.1", served.thread.port), timeout=30) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{"
        )  # answered before the body is read
        assert raw.recv(100).startswith(b"HTTP/1.1 413")
    with pytest.raises(openai.APIStatusError) as raised:
        ask(served.client, "y" * 101)
    assert raised.value.status_code == 413 and "over the server's 100" in raised.value.body["message"]
    assert ask(served.client, "y" * 100)[2] == "first"


def test_one_slow_embedding_does_not_hold_up_other_requests(fakes: dict[str, Fake], tmp_path: Path) -> None:
    data = pool_data(fakes, tmp_path, {"first": {}, "second": {}})
    pool = parse_pool({**data, "routing": "head"}, tmp_path)
    entered, release = threading.Event(), threading.Event()

    def encode(texts: list[str]) -> np.ndarray:
        if any("slow" in text for text in texts):
            entered.set()
            release.wait(WAIT_S)
        return np.ones((len(texts), 8), np.float32)

    embedder = Embedder("fixed", lambda: encode, EmbeddingCache(tmp_path / "embeddings.sqlite"))
    conductor = _conductor(pool, ordered_head(pool.names, ["second", "first"], 8), embedder)
    with ServerThread(create_app(conductor), pool.server) as thread:
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        slow: list[str] = []
        waiting = threading.Thread(target=lambda: slow.append(ask(client, "a slow question")[2]))
        waiting.start()
        assert entered.wait(WAIT_S)
        quick = [ask(client, f"quick question {index}")[2] for index in range(3)]
        assert not release.is_set() and waiting.is_alive()  # answered while the slow one still embeds
        release.set()
        waiting.join(WAIT_S)
    assert quick == ["second"] * 3 and slow == ["second"]


def _conductor(pool: Pool, head: Any, embedder: Embedder) -> Conductor:
    built = build_conductor(pool.model_copy(update={"routing": "static"}))
    return Conductor(pool, head, embedder, built.backends)


def test_the_embedding_cache_is_shared_safely_across_threads(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache.sqlite")
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for index in range(40):
                text = f"text {worker} {index} \ud800"
                cache.put_many("enc", {text: np.full(4, worker, np.float32)})
                assert cache.get_many("enc", [text])[text][0] == worker
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert errors == []


# ---- 5. auth does not turn off silently ----


@pytest.mark.slow  # `merger serve` subprocesses
def test_an_unset_key_variable_refuses_to_start_unless_auth_is_none(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MERGER_TEST_UNSET")}
    data = pool_data(fakes, tmp_path, {"first": {}, "second": {}})
    data["server"]["api_key_env"] = "MERGER_TEST_UNSET_KEY"
    member_key_unset = copy.deepcopy(data)
    member_key_unset["members"][0]["remote"]["api_key_env"] = "MERGER_TEST_UNSET_MEMBER"
    member_key_unset["server"]["auth"] = "none"  # says nothing about the members' keys
    cases = {
        "server": (data, "server.api_key_env names 'MERGER_TEST_UNSET_KEY', which is not set"),
        "member": (
            member_key_unset,
            "member 'first': remote.api_key_env names 'MERGER_TEST_UNSET_MEMBER', which is not set",
        ),
    }
    for name, (pool, message) in cases.items():
        pool_file = tmp_path / f"{name}.yaml"
        pool_file.write_text(yaml.safe_dump(pool))
        finished = subprocess.run(
            [sys.executable, "-m", "merger.cli", "serve", str(pool_file), "--port", "1"],
            env={**env, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = finished.stderr.strip().splitlines()
        assert finished.returncode == 2 and len(lines) == 1, finished.stderr
        assert lines[0].startswith("merger: error: ") and message in lines[0]
    pool_file = tmp_path / "open.yaml"
    pool_file.write_text(yaml.safe_dump({**data, "server": {**data["server"], "auth": "none"}}))
    process, url = serve_process(pool_file, startup_s=300, env=env)
    try:
        client = openai.OpenAI(base_url=url, api_key="anything", max_retries=0, timeout=60)
        assert ask(client)[2] == "first"
    finally:
        process.kill()
        process.wait(timeout=60)


def test_the_refusal_names_the_way_to_serve_without_a_key(
    fakes: dict[str, Fake], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MERGER_TEST_UNSET_KEY", raising=False)
    data = pool_data(fakes, tmp_path)
    data["server"]["api_key_env"] = "MERGER_TEST_UNSET_KEY"
    with pytest.raises(MergerError, match="or say `auth: none` in the pool's server settings"):
        create_app(build_conductor(parse_pool(data, tmp_path)))


# ---- 6. unsupported fields are refused, naming them ----


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"n": 2}, "n"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
    ],
)
def test_an_unsupported_field_is_refused_by_name(
    serve: Callable[..., Served], fakes: dict[str, Fake], arguments: dict[str, Any], field: str
) -> None:
    served = serve()
    with pytest.raises(openai.BadRequestError) as raised:
        ask(served.client, **arguments)
    assert f"unsupported field {field!r}" in raised.value.body["message"]
    assert fakes["first"].state["calls"] == 0


def test_neutral_values_and_bookkeeping_fields_are_accepted(serve: Callable[..., Served]) -> None:
    served = serve()
    accepted = {
        "n": 1,
        "logprobs": False,
        "top_p": 1,
        "presence_penalty": 0,
        "user": "u-1",
        "metadata": {"a": "b"},
    }
    assert ask(served.client, **accepted)[2] == "first"


# ---- 7. slow clients ----


def _closed_by_server(raw: socket.socket) -> bool:
    raw.settimeout(WAIT_S)
    return raw.recv(100) == b""


def test_slow_clients_are_dropped_and_connections_are_bounded(serve: Callable[..., Served]) -> None:
    served = serve(header_timeout_s=0.5, read_timeout_s=0.5, max_header_bytes=2048)
    port = served.thread.port
    with socket.create_connection(("127.0.0.1", port)) as big_header:
        big_header.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096)
        big_header.settimeout(WAIT_S)
        assert big_header.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", port)) as half_header:
        half_header.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert _closed_by_server(half_header)
    with socket.create_connection(("127.0.0.1", port)) as silent:
        assert _closed_by_server(silent)
    with socket.create_connection(("127.0.0.1", port)) as kept_alive:  # a second request, half sent
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        _read_response(kept_alive)
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert _closed_by_server(kept_alive)
    with socket.create_connection(("127.0.0.1", port)) as half_body:
        half_body.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": '
        )
        half_body.settimeout(WAIT_S)
        assert half_body.recv(100).startswith(b"HTTP/1.1 408")

    bounded = serve(max_connections=3, header_timeout_s=WAIT_S)
    idle = [socket.create_connection(("127.0.0.1", bounded.thread.port)) for _ in range(2)]
    try:
        assert eventually(lambda: _status(bounded.url + "/health") == 503)
    finally:
        for connection in idle:
            connection.close()
    assert eventually(lambda: _status(bounded.url + "/health") == 200)


def _read_response(raw: socket.socket) -> bytes:
    raw.settimeout(WAIT_S)
    received = b""
    while b"\r\n\r\n" not in received:
        received += raw.recv(4096)
    head, _, rest = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += raw.recv(4096)
    return rest


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


# ---- 8. static order without a trained head ----


def test_a_pool_serves_in_static_order_without_a_head(
    serve: Callable[..., Served], fakes: dict[str, Fake]
) -> None:
    served = serve(pool_extra={"priority": ["second", "first"]})
    assert served.conductor.head is None
    text, merger, member = ask(served.client)
    assert (text, member) == ("second answers", "second") and merger["ranking"] == [
        "second",
        "first",
        "steady",
    ]
    fakes["second"].state["mode"] = "fail"
    for _ in range(2):
        assert ask(served.client)[2] == "first"
    _, merger, member = ask(served.client)
    assert member == "first" and merger["attempts"][0] == {
        "member": "second",
        "outcome": "skipped: circuit open",
    }
    assert stream(served.client)["member"] == "first"
    assert ask(served.client, model="steady")[2] == "steady"
    assert ask(serve().client)[2] == "first"  # routing: static without priority: the members' order


def test_a_pool_without_a_head_or_static_routing_says_how_to_serve(
    fakes: dict[str, Fake], tmp_path: Path
) -> None:
    data = pool_data(fakes, tmp_path)
    del data["routing"]
    with pytest.raises(
        MergerError, match="run `merger router train POOL.yaml` first; or serve without a head"
    ):
        build_conductor(parse_pool(data, tmp_path))
    with pytest.raises(MergerError, match="priority must name pool members"):
        parse_pool({**data, "priority": ["nobody"]}, tmp_path)


# ---- 9. the OpenAPI schema and strict types ----


def test_openapi_documents_401_and_event_streams_and_types_are_strict(serve: Callable[..., Served]) -> None:
    served = serve()
    with urllib.request.urlopen(served.url + "/openapi.json", timeout=30) as response:
        schema = json.load(response)
    completions = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "413", "503"} <= set(completions)
    assert {"application/json", "text/event-stream"} <= set(completions["200"]["content"])
    assert "401" in schema["paths"]["/v1/models"]["get"]["responses"]
    for field, value in [
        ("plan_execute_verify", 0),
        ("stream", "yes"),
        ("max_tokens", 1.5),
        ("temperature", "1"),
    ]:
        status, payload = post(served.url, body(**{field: value}))
        assert status == 400 and field in payload["error"]["message"], (field, payload)
