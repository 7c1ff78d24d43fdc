"""The conductor over real loopback HTTP: the official openai client talks to it; fake remote members
(second and third local servers) fail, stall or break their streams on command."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings

from merger.conductor.app import create_app
from merger.conductor.local_backend import LocalBackend
from merger.conductor.remote_backend import RemoteBackend
from merger.conductor.routing import Conductor
from merger.conductor.wire import MEMBERS_HEADER
from merger.router.embeddings import Embedder, build_embedder
from merger.router.head import RouterHead
from merger.router.pool import ROLES, Pool, Role, parse_pool
from tests.servers import ServerThread, fake_member, start_member_server

CONDUCTOR_KEY = "sk-conductor-test-7f3a9c"
REMOTE_KEY = "sk-remote-test-91be44"
ORDER = ["flaky", "steady", "local"]


def fake_remote(model: str) -> tuple[FastAPI, dict[str, Any]]:
    """A fake member (tests.servers.fake_member) that wants the remote key."""
    return fake_member(model, key=REMOTE_KEY)


@pytest.fixture(scope="module")
def remotes() -> Iterator[dict[str, tuple[ServerThread, dict[str, Any]]]]:
    servers = {}
    for name in ("flaky", "steady"):
        app, state = fake_remote(name)
        servers[name] = (ServerThread(app).__enter__(), state)
    yield servers
    for server, _ in servers.values():
        server.stop()


@pytest.fixture(autouse=True)
def reset_remotes(remotes: dict[str, tuple[ServerThread, dict[str, Any]]]) -> None:
    for _, state in remotes.values():
        state.update(mode="ok", calls=0, verdict="ACCEPT", prompts=[])


def make_pool(
    tiny_base: Path, remotes: dict[str, tuple[ServerThread, dict[str, Any]]], tmp_path: Path, **server: Any
) -> Pool:
    def remote(name: str, **extra: Any) -> dict[str, Any]:
        url = remotes[name][0].url + "/v1"
        return {
            "name": name,
            "remote": {"base_url": url, "model": name, "api_key_env": "TEST_REMOTE_KEY"},
            **extra,
        }

    data = {
        "members": [
            remote("flaky", timeout_s=1.0),
            remote("steady", roles=["worker", "verifier"], timeout_s=2.0),
            {"name": "local", "path": str(tiny_base), "roles": ["thinker", "worker"]},
        ],
        "router": {"encoder": {"kind": "hidden_states", "member": "local"}, "confidence": 0.5},
        "breaker": {"failures": 2, "window_s": 60, "cooldown_s": 60},
        "server": {
            "api_key_env": "TEST_CONDUCTOR_KEY",
            "max_tokens": 8,
            "first_token_timeout_s": 1.0,
            "timeout_s": 10,
            "max_attempts": 3,
            **server,
        },
        "work_dir": str(tmp_path / "work"),
    }
    return parse_pool(data, tmp_path)


def ordered_head(members: list[str], order: list[str], dim: int, confident: bool = True) -> RouterHead:
    """A linear head whose biases rank `order` first to last for every prompt (weights zero)."""
    scores = [float(len(order) - order.index(name)) for name in members]
    roles = [0.0, 4.0, 0.0] if confident else [4.0, 0.0, 0.0]
    assert ROLES[1] == Role.WORKER
    return RouterHead(
        members=members,
        encoder_id="fixed",
        mean=np.zeros(dim, np.float32),
        scale=np.ones(dim, np.float32),
        w2=np.zeros((dim, len(members) + 3), np.float32),
        b2=np.array(scores + roles, np.float32),
    )


@pytest.fixture(scope="module")
def shared(
    tiny_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, remotes: Any
) -> dict[str, Any]:
    """The expensive parts, once: the local member's model and the embedder (tiny base hidden states)."""
    pool = make_pool(tiny_sources["base"], remotes, tmp_path_factory.mktemp("conductor"))
    return {"local": LocalBackend("local", tiny_sources["base"]), "embedder": build_embedder(pool)}


@pytest.fixture
def conductor_factory(
    tiny_sources: dict[str, Path],
    remotes: Any,
    shared: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Any]:
    monkeypatch.setenv("TEST_CONDUCTOR_KEY", CONDUCTOR_KEY)
    monkeypatch.setenv("TEST_REMOTE_KEY", REMOTE_KEY)
    started: list[ServerThread] = []

    def start(
        order: list[str] = ORDER, confident: bool = True, **server: Any
    ) -> tuple[ServerThread, Conductor, openai.OpenAI]:
        pool = make_pool(tiny_sources["base"], remotes, tmp_path, **server)
        embedder: Embedder = shared["embedder"]
        head = ordered_head(pool.names, order, dim=32, confident=confident)
        backends = {m.name: RemoteBackend(m) for m in pool.members if m.remote is not None}
        backends["local"] = shared["local"]
        conductor = Conductor(pool, head, embedder, backends)
        thread = ServerThread(create_app(conductor)).__enter__()
        started.append(thread)
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key=CONDUCTOR_KEY, max_retries=0, timeout=30)
        return thread, conductor, client

    yield start
    for thread in started:
        thread.stop()


def ask(
    client: openai.OpenAI, text: str = "What is 2 plus 3?", **kwargs: Any
) -> tuple[str, dict[str, Any], str]:
    raw = client.chat.completions.with_raw_response.create(
        model=kwargs.pop("model", "merger"), messages=[{"role": "user", "content": text}], **kwargs
    )
    completion = raw.parse()
    return (
        completion.choices[0].message.content or "",
        completion.model_extra["merger"],
        raw.headers[MEMBERS_HEADER],
    )


def stream_events(client: openai.OpenAI, text: str = "Name a capital.", **kwargs: Any) -> dict[str, Any]:
    """A streamed answer: its pieces, last finish_reason, `merger` field and the members header."""
    raw = client.chat.completions.with_raw_response.create(
        model="merger", messages=[{"role": "user", "content": text}], stream=True, **kwargs
    )
    pieces, finish, merger = [], None, {}
    for event in raw.parse():
        merger = (event.model_extra or {}).get("merger", merger)
        if event.choices and event.choices[0].delta.content:
            pieces.append(event.choices[0].delta.content)
        if event.choices and event.choices[0].finish_reason:
            finish = event.choices[0].finish_reason
    return {"pieces": pieces, "finish": finish, "merger": merger, "member": raw.headers[MEMBERS_HEADER]}


def stream(
    client: openai.OpenAI, text: str = "Name a capital.", **kwargs: Any
) -> tuple[str, list[str], dict[str, Any]]:
    result = stream_events(client, text, **kwargs)
    return "".join(result["pieces"]), result["member"].split(","), result["merger"]


def test_routed_answer_says_which_member_answered(conductor_factory: Any) -> None:
    _, _, client = conductor_factory()
    text, merger, header = ask(client)
    assert text == "flaky answers" and header == "flaky" and merger["members"] == ["flaky"]
    assert merger["ranking"] == ORDER and merger["mode"] == "single"
    _, _, client = conductor_factory(order=["steady", "local", "flaky"])
    assert ask(client)[2] == "steady"


def test_models_health_and_pinning(conductor_factory: Any) -> None:
    thread, _, client = conductor_factory()
    assert [model.id for model in client.models.list()] == ["merger", "flaky", "steady", "local"]
    with urllib.request.urlopen(thread.url + "/health") as response:
        assert json.load(response)["members"]["flaky"]["state"] == "closed"
    text, merger, header = ask(client, model="steady")
    assert (text, header) == ("steady answers", "steady")
    assert merger["ranking"][0] == "steady"


def test_api_key_is_required_and_never_echoed(conductor_factory: Any) -> None:
    thread, _, _ = conductor_factory()
    for key in ("", "sk-wrong"):
        anonymous = openai.OpenAI(base_url=thread.url + "/v1", api_key=key or "none", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as raised:
            anonymous.chat.completions.create(model="merger", messages=[{"role": "user", "content": "hi"}])
        assert CONDUCTOR_KEY not in str(raised.value.body)
    request = urllib.request.Request(thread.url + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as raised_http:
        urllib.request.urlopen(request)
    assert raised_http.value.code == 401


def test_error_falls_back_to_next_ranked_and_redacts_remote_keys(
    conductor_factory: Any, remotes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, client = conductor_factory()
    remotes["flaky"][1]["mode"] = "fail"
    with caplog.at_level(logging.DEBUG):
        text, merger, header = ask(client)
    assert (text, header) == ("steady answers", "steady")
    assert merger["attempts"][0]["member"] == "flaky" and merger["attempts"][0]["outcome"].startswith(
        "failed"
    )
    assert REMOTE_KEY not in json.dumps(merger) and "***" in merger["attempts"][0]["outcome"]
    assert REMOTE_KEY not in caplog.text and CONDUCTOR_KEY not in caplog.text
    assert "flaky failed" in caplog.text


def test_timeout_falls_back(conductor_factory: Any, remotes: Any) -> None:
    _, _, client = conductor_factory()
    remotes["flaky"][1]["mode"] = "stall"
    text, merger, _ = ask(client)
    assert text == "steady answers"
    assert "Timeout" in merger["attempts"][0]["outcome"]


def test_breaker_opens_after_repeated_failures_and_skips_the_member(
    conductor_factory: Any, remotes: Any
) -> None:
    thread, _, client = conductor_factory()
    flaky = remotes["flaky"][1]
    flaky["mode"] = "fail"
    for _ in range(2):
        assert ask(client)[2] == "steady"
    assert flaky["calls"] == 2
    _, merger, header = ask(client)
    assert header == "steady" and flaky["calls"] == 2
    assert merger["attempts"][0] == {"member": "flaky", "outcome": "skipped: circuit open"}
    with urllib.request.urlopen(thread.url + "/health") as response:
        assert json.load(response)["members"]["flaky"]["state"] == "open"


def test_attempts_are_bounded_and_every_member_is_tried_once(conductor_factory: Any, remotes: Any) -> None:
    thread, _, client = conductor_factory(max_attempts=2)
    remotes["flaky"][1]["mode"] = "fail"
    remotes["steady"][1]["mode"] = "fail"
    with pytest.raises(openai.APIStatusError) as raised:
        ask(client)
    assert raised.value.status_code == 503
    assert remotes["flaky"][1]["calls"] == 1 and remotes["steady"][1]["calls"] == 1
    assert "no pool member could answer" in str(raised.value)
    assert REMOTE_KEY not in str(raised.value.body)


def test_local_member_answers_when_every_remote_is_down(conductor_factory: Any, remotes: Any) -> None:
    _, _, client = conductor_factory()
    remotes["flaky"][1]["mode"] = "fail"
    remotes["steady"][1]["mode"] = "stall"
    _, merger, header = ask(client)
    assert header == "local" and merger["members"] == ["local"]
    assert [attempt["member"] for attempt in merger["attempts"]] == ORDER


def test_stream_falls_back_when_it_breaks_or_stalls_before_the_first_token(
    conductor_factory: Any, remotes: Any
) -> None:
    _, _, client = conductor_factory()
    for mode in ("break_before_first", "stall"):
        remotes["flaky"][1]["mode"] = mode
        text, members, merger = stream(client)
        assert (text, members) == ("steady answers", ["steady"]), mode
        assert merger["members"] == ["steady"] and merger["attempts"][0]["member"] == "flaky"
    remotes["flaky"][1]["mode"] = "ok"
    _, _, client = conductor_factory()
    assert stream(client)[:2] == ("flaky answers", ["flaky"])


def test_stream_broken_after_the_first_token_ends_with_an_error(conductor_factory: Any, remotes: Any) -> None:
    _, _, client = conductor_factory()
    remotes["flaky"][1]["mode"] = "break_after_first"
    with pytest.raises(openai.APIError, match="broke its stream"):
        stream(client)


def test_local_member_streams(conductor_factory: Any) -> None:
    _, _, client = conductor_factory(order=["local", "steady", "flaky"])
    _, members, merger = stream(client)
    assert members == ["local"] and merger["attempts"] == [{"member": "local", "outcome": "streaming"}]


def test_every_request_is_answered_when_a_member_is_killed_mid_run(
    tiny_sources: dict[str, Path], shared: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_CONDUCTOR_KEY", CONDUCTOR_KEY)
    monkeypatch.setenv("TEST_REMOTE_KEY", REMOTE_KEY)
    own = {name: (ServerThread(fake_remote(name)[0]).__enter__(), {}) for name in ("flaky", "steady")}
    pool = make_pool(tiny_sources["base"], own, tmp_path)
    backends: dict[str, Any] = {m.name: RemoteBackend(m) for m in pool.members if m.remote is not None}
    backends["local"] = shared["local"]
    conductor = Conductor(pool, ordered_head(pool.names, ORDER, 32), shared["embedder"], backends)
    answered_by = []
    with ServerThread(create_app(conductor)) as thread:
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key=CONDUCTOR_KEY, max_retries=0, timeout=30)
        for index in range(10):
            if index == 4:
                own["flaky"][0].stop()  # the top-ranked member dies
            if index % 2:
                text, members, _ = stream(client, f"question {index}")
                answered_by.append(members[0])
            else:
                text, _, member = ask(client, f"question {index}")
                answered_by.append(member)
            assert text
    own["steady"][0].stop()
    assert answered_by == ["flaky"] * 4 + ["steady"] * 6


@pytest.mark.slow  # member server processes, one SIGKILLed
def test_a_member_process_killed_mid_run_loses_no_request(
    tiny_sources: dict[str, Path], shared: dict[str, Any], tmp_path: Path
) -> None:
    solo = {"name": "solo", "path": str(tiny_sources["specialist1"])}
    process, url = start_member_server(solo, tmp_path, max_tokens=4, startup_s=120)
    try:
        pool = parse_pool(
            {
                "members": [
                    {"name": "solo", "remote": {"base_url": url, "model": "solo"}, "timeout_s": 20},
                    {"name": "local", "path": str(tiny_sources["base"])},
                ],
                "server": {"max_tokens": 4, "first_token_timeout_s": 20},
                "work_dir": str(tmp_path / "work"),
            },
            tmp_path,
        )
        backends: dict[str, Any] = {"solo": RemoteBackend(pool.members[0]), "local": shared["local"]}
        conductor = Conductor(
            pool, ordered_head(pool.names, ["solo", "local"], 32), shared["embedder"], backends
        )
        answered_by = []
        with ServerThread(create_app(conductor)) as thread:
            client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            for index in range(6):
                if index == 3:
                    process.send_signal(signal.SIGKILL)
                    process.wait(timeout=30)
                if index % 2:
                    answered_by.append(stream(client, f"question {index}")[1][0])
                else:
                    answered_by.append(ask(client, f"question {index}")[2])
        assert answered_by == ["solo"] * 3 + ["local"] * 3
    finally:
        process.kill()
        process.wait(timeout=30)


def test_plan_execute_verify_uses_roles_and_one_revision(conductor_factory: Any, remotes: Any) -> None:
    _, _, client = conductor_factory(
        order=["steady", "flaky", "local"], confident=False, plan_execute_verify=True
    )
    _, merger, header = ask(client)
    assert merger["mode"] == "plan_execute_verify"
    roles = [(attempt["role"], attempt["member"]) for attempt in merger["attempts"]]
    # steady is not a thinker, so flaky plans; steady works and verifies; the verdict is ACCEPT
    assert roles == [("thinker", "flaky"), ("worker", "steady"), ("verifier", "steady")]
    assert header == "flaky,steady"

    remotes["steady"][1]["verdict"] = "REVISE: show the sum"
    text, merger, _ = ask(client)
    assert [attempt["role"] for attempt in merger["attempts"]] == ["thinker", "worker", "verifier", "worker"]
    assert "A reviewer says: REVISE: show the sum" in remotes["steady"][1]["prompts"][-1]
    assert text == "steady answers"


def test_confident_router_makes_a_single_call_even_with_plan_execute_verify(
    conductor_factory: Any, remotes: Any
) -> None:
    _, _, client = conductor_factory(confident=True, plan_execute_verify=True)
    _, merger, _ = ask(client)
    assert merger["mode"] == "single" and remotes["flaky"][1]["calls"] == 1
    _, merger, _ = ask(client, extra_body={"plan_execute_verify": False})
    assert merger["mode"] == "single"


def _post(url: str, body: bytes, key: str = CONDUCTOR_KEY) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "invalid request"),
        (b"{}", 400, "messages: Field required"),
        (b'{"model": "merger", "messages": []}', 400, "messages: List should have at least 1 item"),
        (b'{"model": "merger", "messages": [{"role": "wizard", "content": "x"}]}', 400, "messages.0.role"),
        (
            b'{"model": "merger", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
            400,
            "temperature",
        ),
        (
            b'{"model": "merger", "messages": [{"role": "user", "content": "x"}], "n": 3}',
            400,
            "unsupported field 'n'",
        ),
        (
            b'{"model": "merger", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            400,
            "max_tokens",
        ),
        (b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', 404, "unknown model 'gpt-9'"),
    ],
)
def test_malformed_requests_get_a_clear_4xx(
    conductor_factory: Any, body: bytes, status: int, message: str
) -> None:
    thread, _, _ = conductor_factory()
    code, payload = _post(thread.url + "/v1/chat/completions", body)
    assert code == status
    assert message in payload["error"]["message"]


@pytest.mark.slow  # hundreds of generated requests
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error(
    conductor_factory: Any, mode: schemathesis.GenerationMode
) -> None:
    """Property-based requests built from the server's own OpenAPI schema, live on loopback."""
    thread, _, _ = conductor_factory()
    schema = schemathesis.openapi.from_url(thread.url + "/openapi.json")
    paths = {operation.ok().path for operation in schema.get_all_operations()}
    assert paths >= {"/v1/chat/completions", "/v1/models", "/health"}
    auth = {"Authorization": f"Bearer {CONDUCTOR_KEY}"}

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        response = case.call(headers=auth, timeout=30)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text[:300]}"

    check()


@pytest.mark.slow  # trains a head and loads local models
def test_serve_path_loads_the_trained_head_and_local_members(
    tiny_sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from merger.cli import main
    from merger.conductor.routing import build_conductor
    from merger.router.head import train_head
    from merger.router.training import head_dir

    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(
        f"""members:
  - {{name: base, path: {tiny_sources["base"]}}}
  - {{name: s1, path: {tiny_sources["specialist1"]}}}
router: {{encoder: {{kind: hidden_states, member: base}}, hidden_size: 0}}
server: {{max_tokens: 4}}
work_dir: work
"""
    )
    assert main(["serve", str(pool_file)]) == 2
    assert "run `merger router train POOL.yaml` first" in capsys.readouterr().err

    from merger.router.pool import load_pool

    pool = load_pool(pool_file)
    embedder = build_embedder(pool)
    prompts = [
        "The capital of Peru is",
        "Q: what is 3 plus 4? A:",
        "The capital of Chile is",
        "Q: what is 1 plus 1? A:",
    ]
    correct = np.array([[0.0, 1.0]] * len(prompts))  # s1 is always right
    head = train_head(
        embedder(prompts),
        correct,
        pool.names,
        embedder.encoder_id,
        pool.router.model_copy(update={"evaluations": 200}),
    )
    head.save(head_dir(pool))
    with ServerThread(create_app(build_conductor(pool))) as thread:
        client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        text, merger, header = ask(client, prompts[0])
        assert header == "s1" and merger["ranking"] == ["s1", "base"]
        _, members, merger = stream(client, prompts[1])
        assert members == ["s1"], merger


def test_circuit_breaker_window_cooldown_and_probation() -> None:
    from merger.conductor.breaker import CircuitBreaker
    from merger.router.pool import BreakerSettings

    now = [0.0]
    breaker = CircuitBreaker(
        BreakerSettings(failures=3, window_s=10, cooldown_s=30), ["a"], clock=lambda: now[0]
    )
    for moment in (0.0, 5.0, 11.0):  # the first failure has left the window by the third
        now[0] = moment
        breaker.record_failure("a")
    assert breaker.available("a")
    now[0] = 12.0
    breaker.record_failure("a")
    assert not breaker.available("a")
    now[0] = 41.9
    assert not breaker.available("a")
    now[0] = 42.0
    assert breaker.available("a")
    breaker.record_failure("a")  # on probation: one failure reopens
    assert not breaker.available("a")
    now[0] = 72.0
    breaker.record_success("a")
    breaker.record_failure("a")  # closed again: back to needing three
    assert breaker.available("a")


def test_stop_sequences_cut_local_answers_and_reach_remote_members(
    conductor_factory: Any, shared: dict[str, Any], remotes: Any
) -> None:
    from merger.conductor.backends import Generation, cut_at_stop

    assert cut_at_stop("12\nmore", ("\n",)) == ("12", True)
    assert cut_at_stop("abc", ("x", "")) == ("abc", False)

    local: LocalBackend = shared["local"]
    messages = [{"role": "user", "content": "The capital of Peru is"}]
    full = asyncio.run(local.complete(messages, Generation(max_tokens=8), timeout_s=60))
    assert len(full) >= 4
    stop = full[2:4]
    expected = full[: full.find(stop)]
    assert (
        asyncio.run(local.complete(messages, Generation(max_tokens=8, stop=(stop,)), timeout_s=60))
        == expected
    )

    async def streamed() -> str:
        return "".join([piece async for piece in local.stream(messages, Generation(8, stop=(stop,)), 60)])

    assert asyncio.run(streamed()) == expected

    _, _, client = conductor_factory()
    ask(client, stop=["\n", "END"])
    assert remotes["flaky"][1]["stop"] == ["\n", "END"]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_local_member_stops_generating_when_its_call_is_abandoned(
    tiny_sources: dict[str, Path], streaming: bool
) -> None:
    """A deadline or a client that left cancels the call; the generation thread stops at the next token."""
    import threading

    from merger.conductor.backends import Generation

    backend = LocalBackend("local", tiny_sources["base"])
    backend.model.generation_config.eos_token_id = None  # unless stopped, it generates all max_tokens
    forward, calls = backend.model.forward, [0]
    started, abandoned = threading.Event(), threading.Event()

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        started.set()
        if calls[0] == 1:
            # the first token waits until the call has been cancelled: on a loaded machine a token made
            # earlier could answer the call (the stream's first piece) before it is cancelled
            abandoned.wait(60)
        return forward(*args, **kwargs)

    backend.model.forward = counted
    messages = [{"role": "user", "content": "Count:"}]

    def call() -> Any:
        if streaming:
            return anext(aiter(backend.stream(messages, Generation(max_tokens=200), 60)))
        return backend.complete(messages, Generation(max_tokens=200), 60)

    async def abandon() -> None:
        task = asyncio.ensure_future(call())
        await asyncio.to_thread(started.wait, 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        abandoned.set()

    asyncio.run(abandon())
    assert backend._lock.acquire(timeout=60)  # the generation thread has finished
    backend._lock.release()
    assert calls[0] <= 3
    calls[0] = 0
    asyncio.run(backend.complete(messages, Generation(max_tokens=200), 60))
    assert calls[0] == 200  # the control: not abandoned, it runs to max_tokens
