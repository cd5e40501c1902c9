"""Schemathesis fuzzes every operation of the OpenAPI document against the app, with every check.

The API promises that each answer has a documented status code, content type, headers and body
schema, that it refuses what its schema refuses and accepts what its schema accepts, and that it
never answers 5xx. Schemathesis (the OpenAPI fuzzer) generates requests from the app's own
OpenAPI document — schema examples, boundary and negative "coverage" cases (missing parameters,
undeclared methods, missing key), then random valid and invalid data — and runs all its checks
(``-c all`` on its command line) on each answer. It runs once with API keys required and once with
keys off, since the two modes publish different documents (security only with keys).

Reproducible and bounded: ``derandomize`` makes Hypothesis draw the same cases every run, and
``max_examples`` bounds each operation's random phase (the coverage cases come on top). An app is
built per operation on its own SQLite database, with a live worker presence (so readiness is
200, not its documented no-worker 503) and, with keys on, the key schemathesis sends as the
bearer token. A state machine then runs call sequences (a job submitted, then fetched,
cancelled, its results asked for) through links schemathesis infers from the answers.

The schema is loaded from the document of an app that is never served (the document does not
depend on the database) and each case is sent to the per-test app: schemathesis' fixture loader
(``schemathesis.pytest.from_fixture``) does not run under pytest 9, whose nodes lost the
attribute it renames.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.transport import Response
from starlette.types import Message, Receive, Scope, Send

from bitplan.app import crud
from bitplan.app.main import create_app
from bitplan.app.models import ApiKey
from bitplan.app.problems import problem_type
from bitplan.app.settings import Settings
from bitplan.app.worker_presence import record_beat

_ROOT = Path(__file__).resolve().parents[2]
# The key the keyed app stores (hashed) and every request of the keyed run sends.
_KEY = "bp_schemathesis-" + "k" * 32
# Random (fuzzing) cases per operation; the examples and coverage cases come on top. 15 keeps
# the module at 30-60 s on a loaded two-core machine.
_MAX_EXAMPLES = 15
# Seconds a request may take (schemathesis' default is 10): an upload starts a child process,
# which a loaded machine can take seconds to run.
_REQUEST_TIMEOUT_S = 60
# Readiness counts workers that beat within a lease: one hour outlives the test.
_LEASE_S = 3600.0


def _settings(auth: str, *, data_dir: Path, database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=data_dir,
        auth=auth,  # type: ignore[arg-type]
        max_upload_bytes=1024 * 1024,
        lease_seconds=_LEASE_S,
        workers=0,
    )


class _CurrentApp:
    """The ASGI app a schema sends to: it forwards each request to the app of the running test
    (set by the fixtures), so the checks' own follow-up requests reach that app too. It answers
    the lifespan protocol itself: schemathesis keeps the lifespan of an app it served running
    until the process ends, and the apps here need none (nothing is swept, no worker runs)."""

    def __init__(self) -> None:
        self.app: FastAPI | None = None
        self.answers: list[tuple[str, int]] = []  # (path, status) of each request served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert self.app is not None, "no test app is being served"

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.answers.append((scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, recording_send)

    def secured_answers(self) -> list[int]:
        """The statuses of the requests to routes that need a key when keys are on."""
        return [
            status
            for path, status in self.answers
            if path.startswith("/v1/") and not path.startswith("/v1/health")
        ]


CURRENT = _CurrentApp()


def _schema(auth: str) -> Any:
    """The schemathesis schema of the document that an app with ``auth`` publishes."""
    app = create_app(_settings(auth, data_dir=Path("unused"), database_url="sqlite://"))
    document = app.openapi()
    app.state.engine.dispose()  # never connected: the document needs no database
    # With keys on, the key is the token of the document's HTTPBearer scheme, so schemathesis
    # knows it as the real credential: ignored_auth then probes with none and with a wrong one,
    # and the cases that test a missing key go without it.
    schemes = {"openapi": {"HTTPBearer": {"bearer": _KEY}}} if auth == "on" else {}
    config = schemathesis.Config.from_dict({"auth": schemes})
    schema = schemathesis.openapi.from_dict(document, config=config)
    schema.app = CURRENT
    schema.config.update(request_timeout=_REQUEST_TIMEOUT_S)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    # Every check of `schemathesis run -c all`. max_response_time is no conformance check and
    # not among them ("all" here would turn it on with a 10 s limit that a loaded machine fails).
    schema.config.checks.update(
        included_check_names=["all"], excluded_check_names=["max_response_time"]
    )
    return schema


KEYED = _schema("on")
OPEN = _schema("off")

FUZZ = settings(
    max_examples=_MAX_EXAMPLES,
    deadline=None,  # a loaded machine must not turn a slow answer into a failure
    derandomize=True,
    database=None,  # no example database: each run draws the same cases, nothing is stored
    # Schemas with patterns and bounds make Hypothesis filter and draw large inputs; the run
    # is bounded by max_examples instead. The app fixture is shared by all cases of an
    # operation on purpose: like a real server, it keeps what earlier cases created.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


def _app(
    auth: str, tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FastAPI]:
    # A model upload is checked by a child process that imports torch: ~10 s a case on a busy
    # machine, and random bytes are never a model. The stand-in child answers "invalid" at
    # once, so the API's own handling (the 422 problem, the cleanup) is what gets fuzzed here;
    # the real check's outcomes are tested in test_upload_isolation.
    monkeypatch.setattr("bitplan.app.validation.CHILD_MODULE", "tests.app._fake_upload_check")
    monkeypatch.setenv("PYTHONPATH", str(_ROOT))  # the child runs in its scratch folder
    monkeypatch.setenv("BITPLAN_TEST_CHECK", "invalid")
    app = create_app(_settings(auth, data_dir=tmp_path / "data", database_url=sqlite_url))
    record_beat(app.state.engine, "schemathesis-worker")
    if auth == "on":
        with app.state.sessionmaker() as session:
            session.add(ApiKey(name="schemathesis", key_hash=crud.hash_api_key(_KEY)))
            session.commit()
    CURRENT.app, CURRENT.answers = app, []
    yield app
    CURRENT.app = None
    app.state.engine.dispose()
    # A key the cases never carried would pass every check with 401s: some answer must get
    # past the key check (and with keys off, none may be a 401).
    secured = CURRENT.secured_answers()
    if auth == "on":
        assert not secured or set(secured) != {401}, "no request carried the key"
    else:
        assert 401 not in secured


@pytest.fixture
def keyed_app(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FastAPI]:
    yield from _app("on", tmp_path, sqlite_url, monkeypatch)


@pytest.fixture
def open_app(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FastAPI]:
    yield from _app("off", tmp_path, sqlite_url, monkeypatch)


# 422 problems for values that are schema-valid but refused for what no schema can say.
_STATEFUL_REFUSALS = {
    # a model or dataset id that no upload has: no schema lists the ids that exist
    problem_type("unknown-resource"),
    # an Idempotency-Key already used with another body: 422 as the IETF Idempotency-Key
    # draft (draft-ietf-httpapi-idempotency-key-header, section 2.7) asks
    problem_type("idempotency-key-reused"),
}


def _refused_what_no_schema_can_say(case: Case, response: Response) -> bool:
    """Whether the answer is the 422 for a request that is schema-valid yet unacceptable for
    a reason that no OpenAPI schema can express, so ``positive_data_acceptance`` (the check
    that schema-valid requests are accepted) cannot hold for it; a false positive of that one
    check. Every other check still runs on these answers, and any other 422 still fails:

    - a model or dataset id that names no upload, an Idempotency-Key reused with another body
      (:data:`_STATEFUL_REFUSALS`);
    - a pagination cursor of no page the server served: cursors are minted by the server;
    - an uploaded file whose content is not a model or dataset: the schema can only say
      "binary", and random bytes are never a model.
    """
    if response.status_code != 422:
        return False
    problem = response.json()
    if problem.get("type") in _STATEFUL_REFUSALS:
        return True
    if (case.query or {}).get("cursor") and str(problem.get("detail")).startswith("invalid cursor"):
        return True
    uploads = case.media_type == "multipart/form-data"
    return uploads and problem.get("type") == problem_type("invalid-input")


def _validate(case: Case, response: Response, **kwargs: Any) -> None:
    skip = _refused_what_no_schema_can_say(case, response)
    case.validate_response(
        response, excluded_checks=[positive_data_acceptance] if skip else [], **kwargs
    )


def _call_and_validate(case: Case) -> None:
    response = case.call()
    _validate(case, response)


@KEYED.parametrize()
@FUZZ
def test_api_conforms_with_keys(case: Case, keyed_app: FastAPI) -> None:
    _call_and_validate(case)


@OPEN.parametrize()
@FUZZ
def test_api_conforms_without_keys(case: Case, open_app: FastAPI) -> None:
    _call_and_validate(case)


def _machine(schema: Any) -> Any:
    """The schema's state machine: sequences of calls that feed one answer's ids into the
    next request (OpenAPI links that schemathesis infers from Location headers and bodies)."""
    base = schema.as_state_machine()

    class Machine(base):  # type: ignore[misc,valid-type]
        def validate_response(
            self,
            response: Response,
            case: Case,
            additional_checks: list[Any] | None = None,
            **kwargs: Any,
        ) -> None:
            _validate(
                case,
                response,
                additional_checks=additional_checks,
                transport_kwargs=kwargs or None,
                recorder=getattr(self, "recorder", None),
            )

    return Machine


STATEFUL = settings(FUZZ, max_examples=20, stateful_step_count=6)


def test_call_sequences_conform_with_keys(keyed_app: FastAPI) -> None:
    _machine(KEYED).run(settings=STATEFUL)


def test_call_sequences_conform_without_keys(open_app: FastAPI) -> None:
    _machine(OPEN).run(settings=STATEFUL)
