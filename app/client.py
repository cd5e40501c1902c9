"""A small Python client for the bitplan REST API (httpx).

>>> client = BitplanClient("http://127.0.0.1:8000", api_key="bp_...")
>>> model = client.upload_model("model.zip")
>>> job = client.submit_job(model=model["id"], budget="4.5bpw")
>>> job = client.wait_job(job["id"], progress=lambda j: print(j["stage"], j["progress"]))
>>> frontier = client.frontier(job["id"])
>>> client.download_model(job["id"], frontier["points"][0]["plan_id"], "out", to="gguf")

Every non-2xx answer raises :class:`ApiError` carrying the server's problem+json, except that a
server shedding load (429 or 503) is asked again after its ``Retry-After`` (a bounded number of
times, each wait capped): a burst of submissions all get in, just later. Submissions carry an
``Idempotency-Key`` (a random one unless you pass your own), so a retried submission can never
queue a job twice. Polling uses
the job's ``ETag``: an unchanged job costs a 304 with no body. A model export (a plan applied
to the job's model for a runtime) is made by a worker: :meth:`BitplanClient.download_model`
asks again after each ``202``'s ``Retry-After`` until the file comes, and streams it to disk.
Any ``httpx.Client`` can be passed in (tests pass FastAPI's ``TestClient``).
"""

from __future__ import annotations

import email.utils
import logging
import re
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx

from bitplan.app.endpoint import DEFAULT_URL
from bitplan.app.states import TERMINAL_STATES

__all__ = ["DEFAULT_RETRIES", "ApiError", "BitplanClient", "retry_after_s"]

log = logging.getLogger(__name__)

# Uploads can be gigabytes and model validation takes a while: no read timeout by default for
# them; other calls fail after 30 s.
_DEFAULT_TIMEOUT = httpx.Timeout(30.0)
_UPLOAD_TIMEOUT = httpx.Timeout(30.0, read=None, write=None)
# The statuses of a server that is shedding load: the request was not processed, ask again.
_RETRY_STATUSES = frozenset({429, 503})
# Retries of one request, and the longest wait before each: about a minute and a half in all at
# worst, enough for a burst to drain without hanging a script on a server that stays down.
DEFAULT_RETRIES = 6
_MAX_RETRY_WAIT_S = 15.0
# The wait when the server names none: 1, 2, 4, ... seconds (capped as above).
_FALLBACK_WAIT_S = 1.0
# The problem type of a server shedding load (bitplan.app.problems.service_busy). A model
# download retries only that 503: the others name an export that failed (they say when it
# may be tried again), which asking again at once would not cure.
_BUSY_TYPE = "tag:bitplan,2025:problem/busy"
_ZIP_MEDIA_TYPE = "application/zip"
_CHUNK = 1 << 20  # bytes written at a time while a download streams to disk
_FILENAME = re.compile(r'filename="([^"/\\]+)"')  # Content-Disposition's (quoted) file name


def retry_after_s(response: httpx.Response, *, retry: int) -> float:
    """Seconds to wait before asking again: the answer's ``Retry-After`` (delay-seconds or an
    HTTP-date, RFC 9110 §10.2.3), else an exponential fallback; at most ``_MAX_RETRY_WAIT_S``."""
    value = response.headers.get("Retry-After", "").strip()
    wait = _FALLBACK_WAIT_S * 2.0**retry
    if value.isdigit():
        wait = float(value)
    elif value:
        try:
            when = email.utils.parsedate_to_datetime(value)
            wait = (when - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            pass  # an unreadable header: keep the fallback
    return min(max(wait, 0.0), _MAX_RETRY_WAIT_S)


class ApiError(Exception):
    """A non-2xx answer: ``status`` and the problem+json ``problem`` (or a minimal one)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}")


class BitplanClient:
    """Talks to one bitplan server; usable as a context manager (closes its own connection).

    ``retries`` bounds how often one request is repeated after a 429/503 (0: never);
    ``sleep`` waits between them (tests pass a recorder)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        http: httpx.Client | None = None,
        retries: int = DEFAULT_RETRIES,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, got {retries}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries, self._sleep = retries, sleep
        self._owns_http = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=_DEFAULT_TIMEOUT)
        self.http.headers.update(headers)

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> BitplanClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send; repeat after a 429/503 up to ``retries`` times; raise :class:`ApiError` for
        any other non-2xx. (An upload is re-sent whole: httpx rewinds the file it streams.)"""
        response = self.http.request(method, url, **kwargs)
        for retry in range(self.retries):
            if response.status_code not in _RETRY_STATUSES:
                break
            wait = retry_after_s(response, retry=retry)
            log.info(
                "%s %s answered %d; retry %d of %d in %.1f s",
                method,
                url,
                response.status_code,
                retry + 1,
                self.retries,
                wait,
            )
            self._sleep(wait)
            response = self.http.request(method, url, **kwargs)
        if response.status_code >= 400:
            raise _api_error(response)
        return response

    def _json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        """A request whose answer is a JSON object (every JSON answer of the API is one)."""
        body: dict[str, Any] = self._request(method, url, **kwargs).json()
        return body

    def _upload(self, kind: str, path: str | Path) -> dict[str, Any]:
        path = Path(path)
        with path.open("rb") as handle:  # httpx streams the file in chunks
            # A client passed in keeps its own timeouts; ours waits as long as the upload takes.
            extra = {"timeout": _UPLOAD_TIMEOUT} if self._owns_http else {}
            return self._json("POST", f"/v1/{kind}", files={"file": (path.name, handle)}, **extra)

    def upload_model(self, path: str | Path) -> dict[str, Any]:
        """Upload a model file; the same bytes again return the existing model."""
        return self._upload("models", path)

    def upload_dataset(self, path: str | Path) -> dict[str, Any]:
        """Upload a calibration dataset (.txt, .jsonl or .safetensors)."""
        return self._upload("datasets", path)

    def find_upload(
        self, kind: Literal["model", "dataset"], *, sha256: str
    ) -> dict[str, Any] | None:
        """The caller's uploaded model or dataset with these bytes (by sha256), or None.

        Lets a client skip re-sending a file the server already has: one request, answered by
        the list route's ``sha256`` filter (the server keeps one upload per owner and bytes).
        """
        page = self._json("GET", f"/v1/{kind}s", params={"sha256": sha256, "limit": 1})
        return next(iter(page["data"]), None)

    def submit_job(self, *, idempotency_key: str | None = None, **fields: Any) -> dict[str, Any]:
        """Queue a job; ``fields`` are those of ``JobCreate`` (model, budget, calib, ...).

        Without an ``idempotency_key`` a random one is sent, so that a retry after a 429/503
        (or a lost answer) returns the same job instead of queueing a second one."""
        headers = {"Idempotency-Key": idempotency_key or f"bitplan-client-{uuid.uuid4().hex}"}
        return self._json("POST", "/v1/jobs", json=fields, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(
        self, *, state: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        params.update({k: v for k, v in (("state", state), ("cursor", cursor)) if v is not None})
        return self._json("GET", "/v1/jobs", params=params)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}:cancel")

    def wait_job(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        timeout: float | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled and return it.

        ``progress(job)`` is called whenever the job changed. Raises :class:`TimeoutError`
        after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job: dict[str, Any] | None = None
        etag: str | None = None
        while True:
            headers = {"If-None-Match": etag} if etag and job is not None else {}
            response = self._request("GET", f"/v1/jobs/{job_id}", headers=headers)
            if response.status_code != 304:
                job, etag = response.json(), response.headers.get("ETag")
                if progress is not None:
                    progress(job)
            assert job is not None  # the first answer has no If-None-Match, so it has a body
            if job["state"] in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout} s")
            self._sleep(poll_s)

    def frontier(self, job_id: str) -> dict[str, Any]:
        """The job's frontier (``bitplan.frontier/v1``) with a download link on every point."""
        return self._json("GET", f"/v1/jobs/{job_id}/frontier")

    def plan(self, job_id: str, plan_id: str, *, format: str = "json") -> str:
        """One plan as text: ``json``, ``csv``, ``torchao`` or ``llamacpp``."""
        url = f"/v1/jobs/{job_id}/plans/{plan_id}"
        return self._request("GET", url, params={"format": format}).text

    def sensitivity(self, job_id: str) -> str:
        """The sensitivity table as CSV text."""
        return self._request("GET", f"/v1/jobs/{job_id}/sensitivity").text

    def download_model(
        self,
        job_id: str,
        plan_id: str,
        dest: str | Path,
        *,
        to: str = "bitplan",
        timeout: float | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[Path]:
        """Save plan ``plan_id`` of the job applied to its model for runtime ``to`` into the
        folder ``dest``, as ``bitplan apply --to`` writes it (a zip the server sends is
        unpacked there; a single file keeps its name, e.g. ``model.gguf``); returns the files.

        A worker makes the export: while it does, the server answers ``202`` and this waits its
        ``Retry-After`` (``progress(export)`` sees each answer) and asks again. A busy server
        is asked again as by every call; a failed export raises :class:`ApiError` with the
        server's reason (a ``503`` from it says when a request queues it again). Raises
        :class:`TimeoutError` after ``timeout`` seconds.
        """
        url = f"/v1/jobs/{job_id}/plans/{plan_id}/model"
        deadline = None if timeout is None else time.monotonic() + timeout
        busy = 0
        while True:
            with self.http.stream("GET", url, params={"to": to}) as response:
                if response.status_code == 200:
                    return _save_download(response, Path(dest))
                response.read()
            if response.status_code == 202:
                if progress is not None:
                    progress(response.json())
                wait = retry_after_s(response, retry=0)
            elif _is_busy(response) and busy < self.retries:
                wait = retry_after_s(response, retry=busy)
                busy += 1
            else:
                raise _api_error(response)
            if deadline is not None and time.monotonic() + wait > deadline:
                raise TimeoutError(f"the {to} export of plan {plan_id} not ready after {timeout} s")
            self._sleep(wait)

    def download_report(self, job_id: str, dest: str | Path) -> Path:
        """Save the job's HTML report to ``dest`` and return the path."""
        dest = Path(dest)
        dest.write_bytes(self._request("GET", f"/v1/jobs/{job_id}/report").content)
        return dest


def _api_error(response: httpx.Response) -> ApiError:
    """The :class:`ApiError` of a non-2xx answer (its body read)."""
    try:
        problem = response.json()
    except ValueError:
        problem = {"status": response.status_code, "detail": response.text[:500]}
    return ApiError(response.status_code, problem)


def _is_busy(response: httpx.Response) -> bool:
    """Whether the answer is a server shedding load (the request was not processed)."""
    if response.status_code == 429:
        return True
    try:
        kind = response.json().get("type")
    except ValueError:
        kind = None
    return response.status_code == 503 and kind == _BUSY_TYPE


def _save_download(response: httpx.Response, dest: Path) -> list[Path]:
    """Stream a model download into the folder ``dest``: a zip is unpacked, a file is named as
    Content-Disposition says. The bytes land in a temporary file first, so a broken transfer
    leaves no truncated model behind."""
    dest.mkdir(parents=True, exist_ok=True)
    found = _FILENAME.search(response.headers.get("Content-Disposition", ""))
    name = found[1] if found else "model"
    with tempfile.NamedTemporaryFile(dir=dest, prefix=".download-", delete=False) as part:
        partial = Path(part.name)
    try:
        with partial.open("wb") as handle:
            for chunk in response.iter_bytes(_CHUNK):
                handle.write(chunk)
        if response.headers.get("Content-Type", "").startswith(_ZIP_MEDIA_TYPE):
            with zipfile.ZipFile(partial) as archive:
                members = [info.filename for info in archive.infolist() if not info.is_dir()]
                archive.extractall(dest)  # extractall drops absolute and ".." path parts
            return [dest / member for member in members]
        return [partial.replace(dest / name)]
    finally:
        partial.unlink(missing_ok=True)
