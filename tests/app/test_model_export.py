"""``GET /v1/jobs/{id}/plans/{plan_id}/model?to=``: the service's ``bitplan apply --to``.

End to end through the API and a real worker (in this process, ``run_worker(once=True)``): the
first GET queues an export (202 + Retry-After + Location), repeated GETs share it, the worker
makes it and the next GET streams the same bytes as the CLI's ``bitplan apply`` of the same
plan; a single file (GGUF) comes as is, a folder as a zip. The problems: an unknown target, a
job not yet succeeded, an unknown plan or another owner's job; a plan the target cannot express
(final 422); a runtime missing on the worker (503 + Retry-After, then retried by a later GET).

Jobs come from a real search (the first test) or, to stay fast, from a stand-in search runner
that writes one uniform plan of the builtin model (tests.helpers.uniform_plan) through the real
worker. Models come from the test session's cache (trained once per checkout).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from sqlalchemy import delete, insert, select, update
from typer.testing import CliRunner

from bitplan.app import crud, export_run, model_exports, queue, worker
from bitplan.app.api.routes import model_export
from bitplan.app.cli import app as cli_app
from bitplan.app.client import ApiError, BitplanClient
from bitplan.app.main import create_app
from bitplan.app.models import Blob, Job
from bitplan.app.problems import problem_type
from bitplan.app.settings import Settings
from bitplan.app.states import JobKind, JobState
from bitplan.search.plans import write_frontier
from bitplan.search.spec import JobSpec
from bitplan.search.targets import TARGETS
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.models import load_model
from tests.app._api_fixtures import api_client, assert_problem, job_body
from tests.helpers import uniform_plan

# The format of the stand-in runner's plan, per model: bitplan's own int4 for the CNN, a
# llama.cpp block format for tiny-lm so that GGUF can store it, int8 for any other model.
UNIFORM_FORMAT = {"builtin:digits-cnn": "int4-g32", "builtin:tiny-lm": "q8_0"}


def uniform_runner(spec: JobSpec, *, out_dir: Path, cache_dir: Path, **_: Any) -> None:
    """A search job's stand-in: the frontier is one uniform plan of the model (no search)."""
    model = load_model(spec.model, device="cpu", cache_dir=cache_dir)
    model = replace(model, ref=spec.model_name or model.ref)  # as the pipeline names it
    plan = uniform_plan(model, UNIFORM_FORMAT.get(spec.model, "int8"))
    write_frontier(
        out_dir,
        model_ref=model.ref,
        model_sha256=model.sha256,
        budget=None,
        points=[(plan, "exact")],
        best=plan,
    )


def on_model_cache(settings: Settings, cache_dir: Path) -> Settings:
    """The service's settings on the test session's model cache (no retraining)."""
    return settings.model_copy(update={"cache_dir": cache_dir, "optuna_storage": None})


@pytest.fixture
def export_settings(settings: Settings, bitplan_cache_dir: Path) -> Settings:
    return on_model_cache(settings, bitplan_cache_dir)


def _operation() -> Any:
    """The route in the app's own OpenAPI document (which needs no database)."""
    app = create_app(Settings(database_url="sqlite://", data_dir=Path("unused"), auth="off"))
    document = app.openapi()
    app.state.engine.dispose()
    return schemathesis.openapi.from_dict(document)[ROUTE]["GET"]


ROUTE = "/v1/jobs/{job_id}/plans/{plan_id}/model"
OPERATION = _operation()


def conforms(response: httpx.Response) -> httpx.Response:
    """``response``, after checking it against the route's OpenAPI description with every
    schemathesis check (documented status, content type, headers and body schema). A 503 is
    the route's documented answer for an export that may succeed later, so the check that
    flags every 5xx is left out for it."""
    _, _, job_id, _, plan_id, _ = response.request.url.path.strip("/").split("/")
    case = OPERATION.Case(path_parameters={"job_id": job_id, "plan_id": plan_id})
    unavailable = response.status_code == 503
    case.validate_response(response, excluded_checks=[not_a_server_error] if unavailable else [])
    return response


def model_url(job_id: str, plan_id: str, to: str | None = None) -> str:
    url = f"/v1/jobs/{job_id}/plans/{plan_id}/model"
    return url if to is None else f"{url}?to={to}"


def succeeded_job(
    client: TestClient,
    settings: Settings,
    *,
    model: str = "builtin:digits-cnn",
    headers: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Submit a job and let the worker run it with :func:`uniform_runner`: (job id, plan id)."""
    submitted = client.post("/v1/jobs", json=job_body(model=model), headers=headers)
    assert submitted.status_code == 202, submitted.text
    assert worker.run_worker(settings, once=True, runner=uniform_runner) == 1
    job = client.get(f"/v1/jobs/{submitted.json()['id']}", headers=headers).json()
    assert job["state"] == JobState.SUCCEEDED, job["error"]
    return job["id"], job["plans"][0]


def run_exports(settings: Settings) -> int:
    """Run every queued export with the real export runner; how many ran."""
    return worker.run_worker(settings, once=True, runner=uniform_runner)


def export_rows(client: TestClient) -> list[Job]:
    with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(Job).where(Job.kind == JobKind.EXPORT.value)))


def cli_apply(tmp_path: Path, model: str, plan: Path, to: str) -> Path:
    """``bitplan apply MODEL PLAN --to TO -o OUT``; returns OUT."""
    out = tmp_path / f"cli-{to}"
    result = CliRunner().invoke(cli_app, ["apply", model, str(plan), "--to", to, "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def plan_path(settings: Settings, job_id: str, plan_id: str) -> Path:
    return settings.artifact_dir / job_id / "plans" / f"{plan_id}.json"


def test_an_export_is_queued_once_made_by_a_worker_and_equals_the_clis(
    export_settings: Settings, tmp_path: Path
) -> None:
    settings = export_settings
    with api_client(settings) as client:
        body = job_body(trials=2, method="weight")  # a real search, as small as it gets
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        assert worker.run_worker(settings, once=True) == 1
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == JobState.SUCCEEDED, job["error"]
        plan_id = job["plans"][0]
        url = model_url(job_id, plan_id, "bitplan")

        first = conforms(client.get(model_url(job_id, plan_id)))  # ?to= defaults to bitplan
        assert first.status_code == 202, first.text
        assert first.headers["Retry-After"] == str(settings.export_retry_after_s)
        assert first.headers["Location"] == url
        assert first.json() | {"links": None} == {
            "job_id": job_id,
            "plan_id": plan_id,
            "target": "bitplan",
            "state": "queued",
            "stage": "queued",
            "progress": 0.0,
            "eta_s": None,
            "attempts": 0,
            "links": None,
        }
        assert client.get(url).status_code == 202  # asked again: the same export
        (export,) = export_rows(client)
        # The job list and the job routes show planning jobs only.
        assert [listed["id"] for listed in client.get("/v1/jobs").json()["data"]] == [job_id]
        assert_problem(client.get(f"/v1/jobs/{export.id}"), 404)

        assert run_exports(settings) == 1
        ready = conforms(client.get(url))
        assert ready.status_code == 200, ready.text
        assert ready.headers["content-type"] == "application/zip"
        disposition = f'attachment; filename="{plan_id}-bitplan.zip"'
        assert ready.headers["content-disposition"] == disposition
        assert int(ready.headers["content-length"]) == len(ready.content)
        unchanged = conforms(client.get(url, headers={"If-None-Match": ready.headers["ETag"]}))
        assert unchanged.status_code == 304
        assert run_exports(settings) == 0  # nothing was queued again
        assert [row.id for row in export_rows(client)] == [export.id]

    served = zipfile.ZipFile(io.BytesIO(ready.content))
    cli = files_of(
        cli_apply(tmp_path, "builtin:digits-cnn", plan_path(settings, job_id, plan_id), "bitplan")
    )
    assert {name: served.read(name) for name in served.namelist()} == cli
    assert "model.safetensors" in cli
    assert not list(settings.artifact_dir.glob(".*.partial"))


def test_a_single_file_target_is_served_as_is_and_the_client_waits_for_it(
    export_settings: Settings, tmp_path: Path
) -> None:
    settings = export_settings
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the client's wait: the worker runs meanwhile
        waits.append(seconds)
        run_exports(settings)

    with api_client(settings) as http:
        job_id, plan_id = succeeded_job(http, settings, model="builtin:tiny-lm")
        client = BitplanClient(http=http, sleep=sleep)
        files = client.download_model(job_id, plan_id, tmp_path / "served", to="gguf")
        answer = conforms(http.get(model_url(job_id, plan_id, "gguf")))

    assert waits == [float(settings.export_retry_after_s)]  # one 202, its Retry-After honoured
    assert files == [tmp_path / "served" / "model.gguf"]
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["content-disposition"] == 'attachment; filename="model.gguf"'
    cli = cli_apply(tmp_path, "builtin:tiny-lm", plan_path(settings, job_id, plan_id), "gguf")
    assert files_of(tmp_path / "served") == files_of(cli) == {"model.gguf": answer.content}


def test_bad_target_unfinished_job_unknown_plan_and_other_owners_are_refused(
    export_settings: Settings,
) -> None:
    with api_client(export_settings.model_copy(update={"auth": "on"})) as client:
        with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
            _, key_a = crud.create_api_key(session, name="a")
            _, key_b = crud.create_api_key(session, name="b")
        owner = {"Authorization": f"Bearer {key_a}"}
        other = {"Authorization": f"Bearer {key_b}"}
        job_id, plan_id = succeeded_job(client, export_settings, headers=owner)

        refused = assert_problem(
            conforms(client.get(model_url(job_id, plan_id, "onnx"), headers=owner)), 422
        )
        assert all(name in refused["detail"] for name in TARGETS)
        assert_problem(conforms(client.get(model_url(job_id, "no-such-plan"), headers=owner)), 404)
        assert_problem(conforms(client.get(model_url(job_id, plan_id), headers=other)), 404)
        assert_problem(client.get(model_url("no-such-job", plan_id), headers=owner), 404)
        queued = client.post("/v1/jobs", json=job_body(), headers=owner).json()["id"]
        not_ready = assert_problem(
            conforms(client.get(model_url(queued, plan_id), headers=owner)), 409
        )
        assert not_ready["state"] == "queued"
        assert export_rows(client) == []  # none of these queued an export


def test_a_plan_the_target_cannot_express_is_a_final_422(export_settings: Settings) -> None:
    settings = export_settings
    with api_client(settings) as client:
        job_id, plan_id = succeeded_job(client, settings)  # int4-g32: no GGUF type
        url = model_url(job_id, plan_id, "gguf")
        assert client.get(url).status_code == 202
        assert run_exports(settings) == 1
        refused = assert_problem(conforms(client.get(url)), 422)
        assert refused["type"] == problem_type(model_exports.EXPORT_REFUSED)
        assert "GGUF cannot store" in refused["detail"]
        # Final: the same plan and target would fail again, so no GET queues it again.
        _age_failure(client, by_s=settings.export_retry_failed_s + 1)
        assert_problem(client.get(url), 422)
        assert run_exports(settings) == 0


def _age_failure(client: TestClient, *, by_s: float) -> None:
    """Move every failed export's failure ``by_s`` seconds into the past."""
    with client.app.state.sessionmaker() as session:  # type: ignore[attr-defined]
        for row in session.scalars(select(Job).where(Job.state == JobState.FAILED)):
            row.finished_at = row.finished_at - timedelta(seconds=by_s)
        session.commit()


def test_a_missing_runtime_is_a_503_and_a_later_get_queues_it_again(
    export_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = export_settings

    def missing(name: str) -> None:
        raise InputError(f"`--to {name}` needs the runtime packages: pip install (x missing)")

    with api_client(settings) as client:
        job_id, plan_id = succeeded_job(client, settings)
        url = model_url(job_id, plan_id, "bitplan")
        assert client.get(url).status_code == 202
        with monkeypatch.context() as patch:
            patch.setattr(export_run, "target_writer", missing)
            assert run_exports(settings) == 1
        unavailable = assert_problem(conforms(client.get(url)), 503)
        assert unavailable["type"] == problem_type(model_exports.RUNTIME_UNAVAILABLE)
        assert "cannot write bitplan" in unavailable["detail"]
        wait = int(client.get(url).headers["Retry-After"])
        assert 0 < wait <= settings.export_retry_failed_s
        assert run_exports(settings) == 0  # not before Retry-After

        _age_failure(client, by_s=settings.export_retry_failed_s)
        again = conforms(client.get(url))
        assert again.status_code == 202 and again.json()["attempts"] == 0
        assert run_exports(settings) == 1
        assert client.get(url).status_code == 200
        (export,) = export_rows(client)
        assert (export.state, export.attempts, export.error) == (JobState.SUCCEEDED, 1, None)


def test_a_get_that_loses_the_race_to_queue_reads_the_winners_export(
    export_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = export_settings
    with api_client(settings) as client:
        job_id, plan_id = succeeded_job(client, settings)
        url = model_url(job_id, plan_id, "bitplan")
        assert client.get(url).status_code == 202
        # The next GET looks before the winner's insert is visible, then inserts too.
        real = model_exports.find_export
        calls = iter([None])

        def late(session: Any, **kwargs: Any) -> Any:
            return next(calls, None) or real(session, **kwargs)

        monkeypatch.setattr(model_export, "find_export", late)
        second = client.get(url)
        assert second.status_code == 202, second.text
        assert len(export_rows(client)) == 1

        # Two requests requeueing one failed export: the first wins, the second changes nothing.
        (export,) = export_rows(client)
        engine = client.app.state.engine  # type: ignore[attr-defined]
        with engine.begin() as connection:
            connection.execute(update(Job).where(Job.id == export.id).values(state=JobState.FAILED))
        version = export.lease_version
        assert queue.requeue_finished(engine, job_id=export.id, lease_version=version)
        assert not queue.requeue_finished(engine, job_id=export.id, lease_version=version)


def test_the_client_raises_the_failure_of_an_export(export_settings: Settings) -> None:
    settings = export_settings
    with api_client(settings) as http:
        job_id, plan_id = succeeded_job(http, settings)
        client = BitplanClient(http=http, sleep=lambda _: run_exports(settings))
        with pytest.raises(ApiError) as raised:
            client.download_model(job_id, plan_id, settings.data_dir / "out", to="gguf")
    assert raised.value.status == 422 and "GGUF" in str(raised.value)
    assert not (settings.data_dir / "out").exists()  # nothing saved


def test_an_upload_deleted_while_its_export_is_queued_is_a_409_not_a_500(
    export_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = export_settings
    with api_client(settings) as client:
        job_id, plan_id = succeeded_job(client, settings)
        engine = client.app.state.engine  # type: ignore[attr-defined]
        # The job's model as an upload would leave it: a stored file with its blobs row.
        with engine.begin() as connection:
            connection.execute(
                insert(Blob).values(
                    id="blob-1",
                    kind="model",
                    sha256="0" * 64,
                    filename="m.pt",
                    size_bytes=1,
                    path="m.pt",
                )
            )
        with engine.begin() as connection:
            job = connection.execute(select(Job.spec).where(Job.id == job_id)).one()
            connection.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(model_id="blob-1", spec={**job.spec, "model": "m.pt"})
            )
        real = model_export.enqueue_export

        def deleted_first(engine_: Any, **kwargs: Any) -> bool:
            with engine_.begin() as connection:  # the upload's DELETE commits in between
                connection.execute(delete(Blob).where(Blob.id == "blob-1"))
            return real(engine_, **kwargs)

        monkeypatch.setattr(model_export, "enqueue_export", deleted_first)
        response = client.get(model_url(job_id, plan_id, "bitplan"))
        assert problem_type("model-deleted") == assert_problem(response, 409)["type"]
        assert export_rows(client) == []
