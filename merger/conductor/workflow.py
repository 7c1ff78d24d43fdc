"""What the conductor does with a routed request: one call down the ranking, or plan–execute–verify when
it is asked for and the head is not confident that one Worker call suffices. There, a Thinker plans, a
Worker answers following the plan, and a Verifier accepts the answer or asks for one revision; each step
goes to the members that hold its role, with the same fallback as a single call."""

from __future__ import annotations

from dataclasses import dataclass, replace

from merger.conductor.backends import Generation, Messages
from merger.conductor.routing import Attempts, Conductor, Route
from merger.router.pool import Role

PLAN_PROMPT = "List short numbered steps to solve this. Do not solve it.\n\n{question}"
FOLLOW_PLAN_PROMPT = "Follow this plan:\n{plan}"
VERIFY_PROMPT = (
    "Question:\n{question}\n\nProposed answer:\n{draft}\n\n"
    "Reply ACCEPT if the answer is correct; otherwise reply REVISE: followed by what to fix."
)
REVISE_PROMPT = "A reviewer says: {verdict}\nGive the corrected answer."
ACCEPTED = "ACCEPT"


@dataclass
class Answer:
    text: str
    members: list[str]
    attempts: Attempts
    mode: str


def runs_plan_execute_verify(route: Route, pev: bool) -> bool:
    return pev and not route.confident


async def answer(
    conductor: Conductor, route: Route, messages: Messages, generation: Generation, pev: bool
) -> Answer:
    if not runs_plan_execute_verify(route, pev):
        text, member, attempts = await conductor.complete(route.ranking, messages, generation)
        return Answer(text, [member], attempts, "single")
    return await _plan_execute_verify(conductor, route, messages, generation)


def _by_role(conductor: Conductor, route: Route, role: Role) -> list[str]:
    eligible = [name for name in route.ranking if role in conductor.pool.member(name).roles]  # type: ignore[union-attr]
    return eligible or route.ranking


async def _plan_execute_verify(
    conductor: Conductor, route: Route, messages: Messages, generation: Generation
) -> Answer:
    question = messages[-1]["content"]
    all_attempts: Attempts = []
    answered: list[str] = []
    free_form = replace(generation, stop=())  # plans and verdicts span lines; only the answer obeys `stop`

    async def step(role: Role, prompt_messages: Messages, options: Generation = free_form) -> str:
        text, member, attempts = await conductor.complete(
            _by_role(conductor, route, role), prompt_messages, options
        )
        all_attempts.extend({**attempt, "role": role.value} for attempt in attempts)
        answered.append(member)
        return text

    plan = await step(Role.THINKER, [{"role": "user", "content": PLAN_PROMPT.format(question=question)}])
    worker_messages = [{"role": "system", "content": FOLLOW_PLAN_PROMPT.format(plan=plan)}, *messages]
    draft = await step(Role.WORKER, worker_messages, generation)
    verdict = await step(
        Role.VERIFIER, [{"role": "user", "content": VERIFY_PROMPT.format(question=question, draft=draft)}]
    )
    if not verdict.strip().upper().startswith(ACCEPTED):
        revision_messages = [
            *worker_messages,
            {"role": "assistant", "content": draft},
            {"role": "user", "content": REVISE_PROMPT.format(verdict=verdict)},
        ]
        draft = await step(Role.WORKER, revision_messages, generation)
    return Answer(draft, list(dict.fromkeys(answered)), all_attempts, "plan_execute_verify")
