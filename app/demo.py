"""``bitplan demo`` (the README's ``make demo``): the whole service on this machine, in a minute.

It shows what a user of the REST service sees, end to end, without any setup: an embedded
service (SQLite under ``.bitplan/demo``, the API on a free loopback port, one worker process),
a job on a builtin model submitted over HTTP, a live progress bar while it runs, the frontier
as a table, and every result downloaded into ``./bitplan-demo/`` with an offline
``report.html``. Everything is stopped on the way out, Ctrl-C and errors included; a job
interrupted by Ctrl-C is cancelled on the server first.

The demo's own choices are the constants below (the command shows them as its defaults); the
job's other settings are :class:`~bitplan.search.spec.JobSpec`'s defaults. The service, the
client and the library are imported when the demo runs, so importing this module is light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitplan.app.spec_defaults import spec_default

__all__ = ["DEMO_BUDGET", "DEMO_DATA_DIR", "DEMO_MODEL", "DEMO_OUT", "DEMO_TRIALS", "run_demo"]

DEMO_DATA_DIR = Path(".bitplan") / "demo"
DEMO_OUT = Path("bitplan-demo")
DEMO_MODEL = "builtin:digits-cnn"  # trains in seconds on scikit-learn's digits; nothing to fetch
# 4 bits per weight is just below uniform int4-g128 (its scales make it 4.1 bpw): only mixed
# plans fit, which is what bitplan is for.
DEMO_BUDGET = "4bpw"
# The demo's job must finish on a 2-core laptop in well under two minutes: a dozen measured
# trials on top of the exact frontier's seeds already give a frontier with several points.
DEMO_TRIALS = 16
_DEMO_TIMEOUT_S = 600.0  # a stuck demo stops by itself instead of hanging a terminal


def run_demo(
    *,
    out_dir: Path = DEMO_OUT,
    model: str = DEMO_MODEL,
    budget: str = DEMO_BUDGET,
    method: str = spec_default("method"),
    trials: int = DEMO_TRIALS,
    data_dir: Path = DEMO_DATA_DIR,
) -> dict[str, Any]:
    """Run the demo and return the finished job (its ``state`` says whether it succeeded).

    The service's database, uploads and artifacts live in ``data_dir``; trained builtin models
    come from the same cache as the CLI's (``BITPLAN_CACHE_DIR`` or the user cache).
    """
    from bitplan.app.client import BitplanClient
    from bitplan.app.console import console, err_console
    from bitplan.app.embedded import embedded_service
    from bitplan.app.service_cli import download_job, wait_with_progress
    from bitplan.app.settings import Settings
    from bitplan.app.states import JobState
    from bitplan.app.summary import frontier_table, plans_written
    from bitplan.search.plans import BEST_PLAN_ID, plan_id_of, read_frontier, read_plan
    from bitplan.sensitivity.models import resolve_cache_dir

    settings = Settings(
        database_url=f"sqlite:///{data_dir / 'bitplan.db'}",
        data_dir=data_dir,
        cache_dir=resolve_cache_dir(),
        host="127.0.0.1",
        port=0,
        auth="off",
        optuna_storage=f"sqlite:///{data_dir / 'optuna.db'}",
        workers=1,
    )
    worker_log = data_dir / "worker.log"
    console.rule("[bold]bitplan demo")
    with embedded_service(settings, workers=1, worker_log=worker_log) as url:
        console.print(
            f"service: API on {url} (docs at {url}/docs), one worker process "
            f"(log: {worker_log}), database {data_dir / 'bitplan.db'}"
        )
        with BitplanClient(url) as client:
            job = client.submit_job(model=model, budget=budget, method=method, trials=trials)
            console.print(
                f"submitted job {job['id']}: {model}, budget {budget}, "
                f"method {method}, {trials} trials"
            )
            try:
                job = wait_with_progress(client, job["id"], timeout=_DEMO_TIMEOUT_S)
            except (KeyboardInterrupt, TimeoutError):
                client.cancel_job(job["id"])
                err_console.print(f"cancelled job {job['id']}; stopping the service")
                raise
            if job["state"] != JobState.SUCCEEDED:
                return job
            files = download_job(client, job["id"], out_dir)
    frontier = read_frontier(out_dir / "frontier.json")
    best_id = plan_id_of(read_plan(out_dir / "plans" / f"{BEST_PLAN_ID}.json"))
    console.print(frontier_table(frontier))
    console.print(
        f"downloaded {len(files)} files into {out_dir}/: frontier.json, frontier.csv, "
        f"sensitivity.csv, report.html, its exports/ and "
        f"{plans_written(frontier, out_dir / 'plans', best_plan_id=best_id)}",
        highlight=False,
    )
    console.print(f"open [bold]{out_dir / 'report.html'}[/bold] in a browser")
    return job
