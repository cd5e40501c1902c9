"""The HTML report: content, links, escaping and plot geometry from a small job folder written
with the library's own plan/frontier writers, then a real headless Chromium render that proves
the inline script builds the heatmap (its DOM only exists once the script ran)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from bitplan.app.report import render_report
from bitplan.search.budgets import parse_budget
from bitplan.search.plans import Plan, make_plan, write_frontier
from bitplan.search.problem import LayerRow
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format, tensor_bytes

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
EVIL = '<img src=x onerror="alert(1)">'
LAYERS = [
    LayerRow(name="embed", param="embed.weight", numel=64 * 32, kind="embedding", shape=(64, 32)),
    LayerRow(
        name="block.0.attn",
        param="block.0.attn.weight",
        numel=32 * 32,
        kind="linear",
        shape=(32, 32),
    ),
    LayerRow(
        name=f"head</script>{EVIL}",
        param="head.weight",
        numel=10 * 32,
        kind="linear",
        shape=(10, 32),
    ),
]
FORMATS = ["int8", "int4-g32", "int2-g32-asym"]
# (formats per layer, held-out error): three mixed plans that trade size for error.
MIXED = [
    (["int2-g32-asym", "int4-g32", "int4-g32"], 0.2),
    (["int4-g32", "int4-g32", "int8"], 0.03),
    (["int4-g32", "int8", "int8"], 0.004),
]


def _plan(formats: list[str], error: float, budget: str | None) -> Plan:
    return make_plan(
        model_ref=f"model {EVIL}",
        model_sha256="ab" * 32,
        layers=LAYERS,
        choice=dict(zip([lay.name for lay in LAYERS], formats, strict=True)),
        budget=parse_budget(budget) if budget else None,
        unplanned_bytes=1000,
        fp16_bytes=2 * sum(lay.numel for lay in LAYERS) + 1000,
        predicted_error=error / 2,
        metrics={
            "calibration": {"error": error * 0.9},
            "holdout": {"error": error, "accuracy": 1 - error},
        },
    )


def write_job(job_dir: Path, *, budget: str | None = "4kB") -> Path:
    """A job folder like the pipeline's: plans, frontier.json/.csv, sensitivity.csv."""
    points = [(_plan(f, e, budget), "search") for f, e in MIXED]
    uniform = [
        (_plan([fmt] * len(LAYERS), err, budget), f"uniform:{fmt}")
        for fmt, err in zip(FORMATS, (1e-5, 0.05, 0.5), strict=True)
    ]
    write_frontier(
        job_dir,
        model_ref=f"model {EVIL}",
        model_sha256="ab" * 32,
        budget=parse_budget(budget) if budget else None,
        points=points,
        uniform=uniform,
    )
    rows = [
        {
            "layer": lay.name,
            "param": lay.param,
            "format": fmt,
            "error": 10.0 ** -(i + 2 * (2 - j)),
            "numel": lay.numel,
            "bytes": tensor_bytes(parse_format(fmt), *lay.shape),
            "tie": None,
        }
        for i, lay in enumerate(LAYERS)
        for j, fmt in enumerate(FORMATS)
    ]
    pd.DataFrame(rows).to_csv(job_dir / "sensitivity.csv", index=False)
    return job_dir


def _embedded(page: str) -> dict:
    match = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S
    )
    assert match is not None
    return json.loads(match.group(1))


def test_report_is_one_offline_page_with_every_part(tmp_path: Path) -> None:
    path = render_report(write_job(tmp_path))
    page = path.read_text()
    assert path == tmp_path / "report.html"
    # Self-contained: no stylesheet, script or image is fetched from anywhere.
    assert not re.search(r"<link|<script[^>]+src=|https?://", page)
    assert '<svg id="frontier-plot"' in page and 'id="sensitivity"' in page
    data = _embedded(page)
    frontier = json.loads((tmp_path / "frontier.json").read_text())
    ids = [p["plan_id"] for p in frontier["points"] + frontier["uniform"]]
    assert [p["id"] for p in data["plans"]] == ids
    # The preselected plan is the frontier point with the lowest held-out error.
    assert (
        data["selected"]
        == min(frontier["points"], key=lambda p: p["metrics"]["holdout"]["error"])["plan_id"]
    )
    for plan_id in ids:
        assert f'href="plans/{plan_id}.json"' in page
    for name in ("frontier.json", "frontier.csv", "sensitivity.csv"):
        assert f'href="{name}"' in page
    for fmt in FORMATS:  # uniform points are labelled with their format
        assert f">{fmt}</text>" in page


def test_links_base_points_downloads_at_the_api(tmp_path: Path) -> None:
    page = render_report(write_job(tmp_path), links_base="/v1/jobs/j1/").read_text()
    plan_id = json.loads((tmp_path / "frontier.json").read_text())["points"][0]["plan_id"]
    for fmt in ("json", "csv", "torchao", "llamacpp"):
        assert f'href="/v1/jobs/j1/plans/{plan_id}?format={fmt}"' in page
    assert 'href="/v1/jobs/j1/frontier"' in page and 'href="/v1/jobs/j1/sensitivity"' in page
    # frontier.csv has no API route: no dead link to it.
    assert "frontier.csv" not in page and 'href="plans/' not in page


def test_every_job_string_is_escaped(tmp_path: Path) -> None:
    page = render_report(write_job(tmp_path)).read_text()
    assert EVIL not in page and "</script><img" not in page
    assert html_escaped(EVIL) in page
    # The embedded JSON still carries the exact names for the script to show as text.
    names = [row[0] for row in _embedded(page)["plans"][0]["layers"]]
    assert names == [lay.name for lay in LAYERS]


def html_escaped(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def _circles(page: str) -> dict[str, tuple[float, float]]:
    found = re.findall(
        r'<g class="pt point" data-plan="([^"]+)">.*?<circle cx="([\d.]+)" '
        r'cy="([\d.]+)"',
        page,
    )
    return {plan_id: (float(x), float(y)) for plan_id, x, y in found}


def test_plot_places_points_by_size_and_error(tmp_path: Path) -> None:
    page = render_report(write_job(tmp_path)).read_text()
    frontier = json.loads((tmp_path / "frontier.json").read_text())
    circles = _circles(page)
    points = frontier["points"]
    assert set(circles) == {p["plan_id"] for p in points}
    by_size = sorted(points, key=lambda p: p["total_bytes"])
    xs = [circles[p["plan_id"]][0] for p in by_size]
    ys = [circles[p["plan_id"]][1] for p in by_size]
    errors = [p["metrics"]["holdout"]["error"] for p in by_size]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    # SVG y grows downwards: a larger error is drawn higher up (smaller y).
    assert [y for _, y in sorted(zip(errors, ys, strict=True))] == sorted(ys, reverse=True)
    # Errors spanning 1e-5..0.5 get a log axis with decade ticks.
    assert "held-out error (log)" in page and ">1e-5</text>" in page
    # The polyline joins the frontier points from the smallest to the largest.
    line = re.search(r'<polyline class="frontier" points="([^"]+)"', page).group(1)
    drawn = [tuple(map(float, pair.split(","))) for pair in line.split()]
    assert drawn == list(zip(xs, ys, strict=True))


def test_budget_line_sits_at_the_budget_size(tmp_path: Path) -> None:
    page = render_report(write_job(tmp_path, budget="3.2kB")).read_text()
    budget_x = float(re.search(r'<line class="budget" x1="([\d.]+)"', page).group(1))
    frontier = json.loads((tmp_path / "frontier.json").read_text())
    circles = _circles(page)
    below = [circles[p["plan_id"]][0] for p in frontier["points"] if p["total_bytes"] <= 3200]
    above = [circles[p["plan_id"]][0] for p in frontier["points"] if p["total_bytes"] > 3200]
    assert below and above and max(below) <= budget_x < min(above)
    assert "budget 3.2 kB" in page


def test_job_without_budget_or_sensitivity_still_renders(tmp_path: Path) -> None:
    write_job(tmp_path, budget=None)
    (tmp_path / "sensitivity.csv").unlink()
    page = render_report(tmp_path).read_text()
    assert '<line class="budget"' not in page and "has no sensitivity table" in page


def test_a_folder_without_a_frontier_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="frontier"):
        render_report(tmp_path)


# --- a real browser -----------------------------------------------------------------------------

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary, installed with apt-get (Debian) when missing."""
    found = shutil.which("chromium")
    if found:
        return found
    for command in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "chromium", "chromium-driver"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.fail(
                f"the report test needs Chromium and `{' '.join(command)}` failed "
                f"(exit {done.returncode}): {done.stderr.strip()[-500:]}"
            )
    found = shutil.which("chromium")
    if not found:
        pytest.fail("apt-get installed chromium but no `chromium` binary is on PATH")
    return found


def _chromium(binary: str, profile: Path, *args: str) -> str:
    done = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_chromium_renders_the_plot_and_the_scripted_heatmap(tmp_path: Path, chromium: str) -> None:
    job = write_job(tmp_path / "job")
    report = render_report(job)
    url = report.resolve().as_uri()
    dom = _chromium(chromium, tmp_path / "profile", "--dump-dom", url)
    source = report.read_text()
    assert 'id="heatmap"' not in source  # so finding it below proves the script ran
    assert '<svg id="frontier-plot"' in dom
    heatmap = re.search(r'<table class="grid-table" id="heatmap">(.*?)</table>', dom, re.S)
    assert heatmap is not None
    assert len(re.findall(r"<tr data-layer=", heatmap.group(1))) == len(LAYERS)
    assert len(re.findall(r'<td class="cell', heatmap.group(1))) == len(LAYERS) * len(MIXED)
    selected = _embedded(source)["selected"]
    assert f'<g class="pt point selected" data-plan="{selected}">' in dom
    assert re.search(r'<td class="num[^"]*chosen"', dom)  # the plan's formats are outlined
    assert f'<option value="{selected}">' in dom and "held-out accuracy" in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    _chromium(
        chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", url
    )
    assert shot.stat().st_size > 10_000  # a real page, not a blank canvas
