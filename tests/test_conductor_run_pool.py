"""A pool shaped like recipes/pool-skills.yaml (teacher-forced outcomes read with `tasks.metric: acc`, a
finished run's winner as a `run:` member) trained with `merger router train` and served through its head
over real loopback HTTP, with the conductor's fallback, deadline, breaker and strict-request guarantees."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest

from merger.cli import main
from merger.conductor.app import create_app
from merger.conductor.routing import build_conductor
from merger.router.pool import load_pool
from tests.servers import ServerThread
from tests.test_conductor import ask, stream
from tests.test_router_comparison import write_teacher_forced_task
from tests.test_router_pool import write_finished_run

WINNER = "{name: winner, run: runs/skills, chat_template: false}"
PROMPT = "Q: what is 2 plus 3?\nA:"


def tiny_tf_router(evals: Path) -> str:
    """A pool's tasks and router blocks: tiny_tf's outcomes, a small head on the base's hidden states."""
    return f"""tasks: {{names: [tiny_tf], include_path: {evals}, metric: acc, limit: 6, batch_size: 4}}
router:
  encoder: {{kind: hidden_states, member: base}}
  hidden_size: 4
  evaluations: 200
  holdout_fraction: 0.34"""


@pytest.fixture(scope="module")
def trained_pool(tiny_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pool file, its head trained by `merger router train` on the members' teacher-forced outcomes."""
    root = tmp_path_factory.mktemp("run_pool")
    evals = root / "evals"
    write_teacher_forced_task(evals)
    write_finished_run(root / "runs/skills", tiny_sources)
    pool_file = root / "pool.yaml"
    pool_file.write_text(
        f"""members:
  - {{name: base, path: {tiny_sources["base"]}, chat_template: false}}
  - {{name: s1, path: {tiny_sources["specialist1"]}, chat_template: false}}
  - {WINNER}
{tiny_tf_router(evals)}
breaker: {{failures: 2, window_s: 600, cooldown_s: 600}}
server: {{max_tokens: 4}}
work_dir: work
"""
    )
    assert main(["router", "train", str(pool_file)]) == 0
    return pool_file


def serve(pool_file: Path) -> tuple[ServerThread, openai.OpenAI]:
    pool = load_pool(pool_file)
    thread = ServerThread(create_app(build_conductor(pool)), pool.server).__enter__()
    client = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    return thread, client


def health(thread: ServerThread) -> dict:
    with urllib.request.urlopen(thread.url + "/health") as response:
        return json.load(response)


def test_the_trained_head_routes_over_every_member_and_the_run_member_answers(trained_pool: Path) -> None:
    thread, client = serve(trained_pool)
    try:
        assert [model.id for model in client.models.list()] == ["merger", "base", "s1", "winner"]
        _, merger, header = ask(client, PROMPT, model="merger")
        assert sorted(merger["ranking"]) == ["base", "s1", "winner"]
        assert header == merger["ranking"][0] and merger["mode"] == "single"
        _, merger, header = ask(client, PROMPT, model="winner")
        assert header == "winner" and merger["attempts"] == [{"member": "winner", "outcome": "answered"}]
        _, members, merger = stream(client, PROMPT)
        assert members == [merger["ranking"][0]]
        # no silent drops: what the conductor cannot honour is refused, naming the field
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.chat.completions.create(
                model="merger",
                messages=[{"role": "user", "content": PROMPT}],
                response_format={"type": "json_object"},
            )
    finally:
        thread.stop()


def test_a_run_member_past_its_deadline_falls_back_then_its_breaker_opens(trained_pool: Path) -> None:
    impatient = trained_pool.parent / "impatient.yaml"
    winner_past_deadline = WINNER.replace("}", ", deadline_s: 0.000001}")
    impatient.write_text(trained_pool.read_text().replace(WINNER, winner_past_deadline))
    thread, client = serve(impatient)
    try:
        for _ in range(2):  # breaker.failures: 2
            _, merger, header = ask(client, PROMPT, model="winner")
            assert header != "winner" and header in ("base", "s1")
            assert merger["attempts"][0]["member"] == "winner"
            assert "deadline" in merger["attempts"][0]["outcome"]
        assert health(thread)["members"]["winner"]["state"] == "open"
        _, merger, header = ask(client, PROMPT, model="winner")
        assert merger["attempts"][0] == {"member": "winner", "outcome": "skipped: circuit open"}
        assert header in ("base", "s1")
    finally:
        thread.stop()
