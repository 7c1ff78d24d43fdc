"""Faults on every side of the conductor: no request may hang.

Local fake OpenAI-compatible members on 127.0.0.1 (tests.servers.fake_member in threads) answer 500, 429
with Retry-After, stall, trickle one byte a second, stream without end, break their streams before and
after the first token, answer invalid JSON, or close every connection; one healthy member runs in its own
process and is SIGKILLed a third of the way through the run and restarted at two thirds; one more is
healthy throughout. `merger serve` (a subprocess) serves them as one pool in static order (no trained
head), and N requests go through the official openai client, half of them streaming, 16 at a time; each
member in turn is asked for by name, so that it is tried first (then the static order follows).

A request is hung when it runs past the configured bound (max_attempts × deadline_s, plus a grace for the
conductor itself); the client abandons it there, so the run always ends.

Usage: python benchmarks/conductor_faults.py [--requests 120] [--concurrency 16] [--deadline 2]
Prints one line per outcome, answered/total, hung, p50/p95 latency; the last line is JSON.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.servers import ClosingServer, ServerThread, fake_member, free_port, serve_process  # noqa: E402

# (member name, fake mode, extra state); the members' order is the static routing order
FAULTY = [
    ("fails", "fail", {}),
    ("rate-limited", "rate_limit", {"retry_after": "2"}),
    ("stalls", "stall", {"stall_s": 600.0}),
    ("trickles", "trickle", {"trickle_s": 1.0}),
    ("endless", "endless", {"endless_s": 0.01}),
    ("breaks-early", "break_before_first", {}),
    ("breaks-late", "break_after_first", {}),
    ("bad-json", "invalid_json", {}),
]
KILLED, HEALTHY, CLOSER = "killed", "healthy", "closes"
GRACE_S = 5.0  # the conductor's own work on a busy machine, on top of the member deadlines


def serve_member_process(port: int) -> subprocess.Popen:
    """A healthy fake member in its own process (this script with --member-port)."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--member-port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_member(port: int) -> None:
    import uvicorn

    app, _ = fake_member(KILLED)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def wait_until_listening(port: int, process: subprocess.Popen, bound_s: float = 120) -> None:
    import socket

    give_up = time.monotonic() + bound_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(f"the member process on port {port} did not come up") from None
            time.sleep(0.1)


def pool_config(urls: dict[str, str], deadline_s: float, work_dir: Path) -> dict[str, Any]:
    names = [name for name, _, _ in FAULTY] + [CLOSER, KILLED, HEALTHY]
    return {
        "members": [{"name": name, "remote": {"base_url": urls[name], "model": name}} for name in names],
        "routing": "static",
        "breaker": {"failures": 2, "window_s": 30, "cooldown_s": 3},
        "server": {
            "deadline_s": deadline_s,
            "timeout_s": 30,  # per read: longer than the deadline, so only the deadline stops a trickle
            "first_token_timeout_s": deadline_s,
            "max_attempts": len(names),
            "max_tokens": 16,
        },
        "work_dir": str(work_dir),
    }


def one_request(
    client: openai.OpenAI, index: int, first_choice: str, bound_s: float
) -> tuple[str, float, str]:
    """(outcome, seconds, who answered) of request `index`, streaming when odd; `first_choice` is tried
    first (unless its circuit is open), then the pool's static order."""
    started = time.monotonic()
    arguments: dict[str, Any] = {
        "model": first_choice,
        "messages": [{"role": "user", "content": f"question {index}: what is {index} plus 1?"}],
    }
    try:
        if index % 2 == 0:
            raw = client.chat.completions.with_raw_response.create(**arguments)
            raw.parse()
            return "answered", time.monotonic() - started, raw.headers["x-merger-members"]
        raw = client.chat.completions.with_raw_response.create(**arguments, stream=True)
        finish = None
        events = raw.parse()
        for event in events:
            if time.monotonic() - started > bound_s:
                events.close()
                return "hung", time.monotonic() - started, "-"
            if event.choices and event.choices[0].finish_reason:
                finish = event.choices[0].finish_reason
        outcome = "answered" if finish == "stop" else f"answered, finish {finish}"
        return outcome, time.monotonic() - started, raw.headers["x-merger-members"]
    except openai.APITimeoutError:
        return "hung", time.monotonic() - started, "-"
    except openai.APIStatusError as error:
        return f"HTTP {error.status_code}", time.monotonic() - started, "-"
    except openai.APIError as error:  # an error event after the first token (the stream broke)
        kind = "stream broke after its first token" if "broke its stream" in str(error) else "error"
        return kind, time.monotonic() - started, "-"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--deadline", type=float, default=2.0, help="server.deadline_s of the pool")
    parser.add_argument("--member-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.member_port:
        run_member(args.member_port)
        return

    threads: list[ServerThread] = []
    urls: dict[str, str] = {}
    for name, mode, extra in [*FAULTY, (HEALTHY, "ok", {})]:
        app, state = fake_member(name)
        state.update(mode=mode, **extra)
        threads.append(ServerThread(app).__enter__())
        urls[name] = threads[-1].url + "/v1"
    logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)  # the fakes' failures are the point
    closer = ClosingServer().__enter__()
    urls[CLOSER] = closer.url + "/v1"
    member_port = free_port()
    member = serve_member_process(member_port)
    urls[KILLED] = f"http://127.0.0.1:{member_port}/v1"
    conductor = None
    lock = threading.Lock()
    done = [0]
    events_log: list[str] = []

    def kill_and_restart(finished: int) -> None:
        nonlocal member
        if finished == args.requests // 3:
            member.send_signal(signal.SIGKILL)
            member.wait()
            events_log.append(f"member {KILLED!r} SIGKILLed after {finished} requests")
        elif finished == 2 * args.requests // 3:
            member = serve_member_process(member_port)
            events_log.append(f"member {KILLED!r} restarted after {finished} requests")

    try:
        wait_until_listening(member_port, member)
        with tempfile.TemporaryDirectory() as work:
            pool = pool_config(urls, args.deadline, Path(work))
            pool_file = Path(work) / "faults-pool.yaml"
            pool_file.write_text(yaml.safe_dump(pool))
            conductor, url = serve_process(pool_file, startup_s=300)
            bound_s = pool["server"]["max_attempts"] * args.deadline + GRACE_S
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=bound_s + 10)

            names = [member["name"] for member in pool["members"]]

            def timed(index: int) -> tuple[str, float, str]:
                # every member comes first in turn, once plain and once streaming
                result = one_request(client, index, names[(index // 2) % len(names)], bound_s)
                with lock:
                    done[0] += 1
                    kill_and_restart(done[0])
                return result

            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool_of_clients:
                results = list(pool_of_clients.map(timed, range(args.requests)))
            wall_s = time.monotonic() - started
    finally:
        for process in (conductor, member):
            if process is not None:
                process.kill()
                process.wait()
        closer.stop()
        for thread in threads:
            thread.stop()

    outcomes = collections.Counter(outcome for outcome, _, _ in results)
    answered_by = collections.Counter(who for outcome, _, who in results if outcome.startswith("answered"))
    latencies = [seconds for _, seconds, _ in results]
    hung = sum(outcome == "hung" or seconds > bound_s for outcome, seconds, _ in results)
    answered = sum(outcome.startswith("answered") for outcome in outcomes.elements())
    for line in events_log:
        print(f"-- {line}")
    print(f"{'outcome':40} count")
    for outcome, count in outcomes.most_common():
        print(f"{outcome:40} {count}")
    print(f"answered by: {dict(answered_by)}")
    print(
        f"answered {answered}/{len(results)}, hung (past {bound_s:g}s) {hung}, "
        f"p50 {percentile(latencies, 0.5):.2f}s, p95 {percentile(latencies, 0.95):.2f}s, "
        f"max {max(latencies):.2f}s, wall {wall_s:.1f}s"
    )
    print(
        json.dumps(
            {
                "answered": answered,
                "total": len(results),
                "hung": hung,
                "bound_s": bound_s,
                "deadline_s": args.deadline,
                "concurrency": args.concurrency,
                "outcomes": dict(outcomes),
                "answered_by": dict(answered_by),
                "p50_s": round(percentile(latencies, 0.5), 3),
                "p95_s": round(percentile(latencies, 0.95), 3),
                "max_s": round(max(latencies), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
