"""Failover on a real pool: one member runs in its own `merger serve` process and is SIGKILLed mid-run.

The pool's trained router (run `merger router train POOL` first) routes held-out prompts of the pool's
task set through the conductor over loopback HTTP, with the official openai client, alternating plain and
streaming requests. The member the router picks most often for those prompts (or --kill NAME) is served
by a one-member `merger serve` process and reached as a remote member; after --kill-after requests that
process is SIGKILLed. Every later request must fall back to the next-ranked member.

Usage: python benchmarks/pool_failover.py recipes/pool-zoo.yaml [--requests 30] [--kill-after 10]
Prints who answered each request; the last line is JSON with answered / total.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import openai  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from merger.conductor.app import create_app  # noqa: E402
from merger.conductor.backend_factory import build_backend  # noqa: E402
from merger.conductor.remote_backend import RemoteBackend  # noqa: E402
from merger.conductor.routing import Conductor  # noqa: E402
from merger.conductor.wire import MEMBERS_HEADER  # noqa: E402
from merger.router.embeddings import build_embedder  # noqa: E402
from merger.router.outcomes import build_outcome_table  # noqa: E402
from merger.router.pool import Member, Pool, RemoteEndpoint, load_pool  # noqa: E402
from merger.router.training import load_head  # noqa: E402
from tests.servers import ServerThread, start_member_server  # noqa: E402


def held_out_requests(pool: Pool, count: int, seed: int) -> list[str]:
    """Held-out prompts of the head, the same number from every task, in a seeded order."""
    table = build_outcome_table(pool)
    held_out = set(load_head(pool).meta["held_out_items"])
    by_task: dict[str, list[str]] = collections.defaultdict(list)
    for item, task, prompt in zip(table.item_ids, table.tasks, table.prompts, strict=True):
        if item in held_out:
            by_task[task].append(prompt)
    rng = np.random.default_rng(seed)
    for prompts in by_task.values():
        rng.shuffle(prompts)
    interleaved = [prompt for group in zip(*by_task.values(), strict=False) for prompt in group]
    return interleaved[:count]


def ask(client: openai.OpenAI, prompt: str, streaming: bool, max_tokens: int) -> tuple[str, str]:
    """(answer text, member that answered) through the conductor's HTTP API."""
    arguments: dict[str, Any] = {
        "model": "merger",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stop": ["\n"],
    }
    if not streaming:
        raw = client.chat.completions.with_raw_response.create(**arguments)
        return raw.parse().choices[0].message.content or "", raw.headers[MEMBERS_HEADER]
    raw = client.chat.completions.with_raw_response.create(**arguments, stream=True)
    pieces = [event.choices[0].delta.content or "" for event in raw.parse() if event.choices]
    return "".join(pieces), raw.headers[MEMBERS_HEADER].split(",")[0]


def answer(
    client: openai.OpenAI,
    prompt: str,
    index: int,
    kill_after: int,
    process: subprocess.Popen,
    max_tokens: int,
) -> str | None:
    """Request `index` (streaming when odd), SIGKILLing the member's process first when its turn has come;
    prints the line and returns the member that answered, None when no member did."""
    if index == kill_after:
        process.send_signal(signal.SIGKILL)
        process.wait()
        print(f"-- SIGKILLed the member process (pid {process.pid}) --")
    streaming = bool(index % 2)
    try:
        text, member = ask(client, prompt, streaming, max_tokens)
    except openai.APIError as error:
        text, member = f"ERROR {error}", None
    question = prompt.splitlines()[0][:60]
    print(f"{index:3d} {'stream' if streaming else 'plain ':6} {member or '-':8} {question!r} -> {text!r}")
    return member


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pool", type=Path)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--kill-after", type=int, default=10)
    parser.add_argument("--kill", help="member to kill (default: the one the router picks most)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pool = load_pool(args.pool)
    head, embedder = load_head(pool), build_embedder(pool)
    prompts = held_out_requests(pool, args.requests, args.seed)
    first_choices = [head.members[i] for i in np.argmax(head.forward(embedder(prompts))[0], axis=1)]
    victim_name = args.kill or collections.Counter(first_choices).most_common(1)[0][0]
    victim = pool.member(victim_name)
    if victim is None or not victim.is_local:
        sys.exit(f"--kill {victim_name!r} is not a local member of the pool")
    print(f"router's first choices: {dict(collections.Counter(first_choices))}; killing {victim_name}")

    with tempfile.TemporaryDirectory() as work:
        spec = victim.model_dump(mode="json", exclude_none=True)
        process, url = start_member_server(spec, Path(work), pool.server.max_tokens, pool.registry_root)
        try:
            remote = Member(
                name=victim.name,
                roles=victim.roles,
                timeout_s=victim.timeout_s,
                remote=RemoteEndpoint(base_url=url, model=victim.name),
            )
            members = [remote if member.name == victim.name else member for member in pool.members]
            backends = {
                member.name: RemoteBackend(member)
                if member is remote
                else build_backend(member, pool.registry_root, pool.exports_dir)
                for member in members
            }
            conductor = Conductor(pool.model_copy(update={"members": members}), head, embedder, backends)
            with ServerThread(create_app(conductor)) as server:
                client = openai.OpenAI(
                    base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300
                )
                answered = [
                    answer(client, prompt, index, args.kill_after, process, pool.server.max_tokens)
                    for index, prompt in enumerate(prompts)
                ]
        finally:
            process.kill()
    before, after = answered[: args.kill_after], answered[args.kill_after :]
    result = {
        "answered": sum(member is not None for member in answered),
        "total": len(answered),
        "killed": victim_name,
        "answered_by_before_kill": dict(collections.Counter(before)),
        "answered_by_after_kill": dict(collections.Counter(after)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
