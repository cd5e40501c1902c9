"""The HTML report, read through an HTML parser: content, links and exports, escaping and plot
geometry from job folders written with the library's own plan/frontier writers; then a real
headless Chromium render that proves the script runs and measures the layout at 1400 px (labels
clear of each other, nothing cut by its section, the selected heatmap column in view)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from bitplan.app.report import render_report
from bitplan.search.budgets import parse_budget
from bitplan.search.exports import plan_to_csv, plan_to_llamacpp, plan_to_torchao
from bitplan.search.plans import Plan, make_plan, metrics_scope, read_plan, write_frontier
from bitplan.search.problem import LayerRow
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import parse_format, tensor_bytes

EVIL = '<img src=x onerror="alert(1)">'
FORMATS = ["int8", "int4-g32", "int2-g32-asym"]
# (formats per layer, held-out error): three mixed plans that trade size for error.
MIXED = [
    (["int2-g32-asym", "int4-g32", "int4-g32"], 0.2),
    (["int4-g32", "int4-g32", "int8"], 0.03),
    (["int4-g32", "int8", "int8"], 0.004),
]
# Module names llama.cpp's export can name (LLaMA-style), for the job that has that export.
LLAMA_NAMES = ("model.embed_tokens", "model.layers.0.self_attn.q_proj", "lm_head")


def _layers(names: tuple[str, str, str]) -> list[LayerRow]:
    shapes = [(64, 32), (32, 32), (10, 32)]
    kinds = ["embedding", "linear", "linear"]
    return [
        LayerRow(name=n, param=f"{n}.weight", numel=r * c, kind=k, shape=(r, c))
        for n, (r, c), k in zip(names, shapes, kinds, strict=True)
    ]


LAYERS = _layers(("embed", "block.0.attn", f"head</script>{EVIL}"))


def _plan(
    layers: list[LayerRow], formats: list[str], error: float, budget: str | None, ref: str
) -> Plan:
    return make_plan(
        model_ref=ref,
        model_sha256="ab" * 32,
        layers=layers,
        choice=dict(zip([lay.name for lay in layers], map(parse_format, formats), strict=True)),
        budget=parse_budget(budget) if budget else None,
        unplanned_bytes=1000,
        fp16_bytes=2 * sum(lay.numel for lay in layers) + 1000,
        predicted_error=error / 2,
        metrics={
            "calibration": {"error": error * 0.9},
            "holdout": {"error": error, "accuracy": 1 - error},
        },
    )


def write_job(
    job_dir: Path,
    *,
    budget: str | None = "4kB",
    layers: list[LayerRow] = LAYERS,
    mixed: list[tuple[list[str], float]] = MIXED,
    ref: str = f"model {EVIL}",
    scope: dict[str, str] | None = None,
) -> Path:
    """A job folder like the pipeline's: plans, frontier.json/.csv, sensitivity.csv."""
    points = [(_plan(layers, f, e, budget, ref), "search") for f, e in mixed]
    uniform = [
        (_plan(layers, [fmt] * len(layers), err, budget, ref), f"uniform:{fmt}")
        for fmt, err in zip(FORMATS, (1e-5, 0.05, 0.5), strict=True)
    ]
    write_frontier(
        job_dir,
        model_ref=ref,
        model_sha256="ab" * 32,
        budget=parse_budget(budget) if budget else None,
        points=points,
        uniform=uniform,
        best=points[-1][0] if points else None,  # as a job does: plans/best.json
        scope=scope,
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
        for i, lay in enumerate(layers)
        for j, fmt in enumerate(FORMATS)
    ]
    pd.DataFrame(rows).to_csv(job_dir / "sensitivity.csv", index=False)
    return job_dir


def _frontier(job_dir: Path) -> dict:
    return json.loads((job_dir / "frontier.json").read_text())


# --- an element tree from the stdlib HTML parser ------------------------------------------------

VOID = {"meta", "link", "br", "img", "input", "hr", "source", "col", "area", "base", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""  # this element's own text, children's excluded

    def walk(self) -> list[Node]:
        return [self] + [n for c in self.children for n in c.walk()]

    def all(self, tag: str, **attrs: str) -> list[Node]:
        return [
            n
            for n in self.walk()
            if n.tag == tag and all(n.attrs.get(k.rstrip("_")) == v for k, v in attrs.items())
        ]

    def one(self, tag: str, **attrs: str) -> Node:
        (found,) = self.all(tag, **attrs)
        return found

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def full_text(self) -> str:
        return self.text + "".join(c.full_text() for c in self.children)


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        while self.stack[-1].tag != tag:  # an element left open closes with its parent
            self.stack.pop()
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].text += data


def parse(page: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(page)
    builder.close()
    return builder.root


def _embedded(doc: Node) -> dict:
    return json.loads(doc.one("script", type="application/json", id="report-data").text)


def _links(doc: Node, plan_id: str) -> dict[str, str | None]:
    """Label -> href of a plan's downloads row (None: shown as unavailable)."""
    row = doc.one("tr", **{"data-plan": plan_id})
    found: dict[str, str | None] = {a.full_text(): a.attrs["href"] for a in row.all("a")}
    for span in row.all("span", class_="na"):
        found[span.full_text().removesuffix(": n/a")] = None
    return found


# --- content and links --------------------------------------------------------------------------


def test_report_is_one_offline_page_with_every_part(tmp_path: Path) -> None:
    path = render_report(write_job(tmp_path))
    assert path == tmp_path / "report.html"
    doc = parse(path.read_text())
    # Self-contained: nothing is fetched (no link element, no script or image source, no URL).
    assert not doc.all("link") and not doc.all("img")
    assert [s.attrs for s in doc.all("script")] == [
        {"type": "application/json", "id": "report-data"},
        {},
    ]
    assert "function" in doc.all("script")[1].text and "--accent" in doc.one("style").text
    assert not [n for n in doc.walk() if "://" in n.attrs.get("href", "") + n.attrs.get("src", "")]
    for part in ("frontier-plot", "heatmap", "sensitivity", "downloads", "plan-select"):
        assert len([n for n in doc.walk() if n.attrs.get("id") == part]) == 1, part
    data = _embedded(doc)
    frontier = _frontier(tmp_path)
    ids = [p["plan_id"] for p in frontier["points"] + frontier["uniform"]]
    assert [p["id"] for p in data["plans"]] == ids
    # The preselected plan is the frontier point with the lowest held-out error.
    best = min(frontier["points"], key=lambda p: p["metrics"]["holdout"]["error"])["plan_id"]
    assert data["selected"] == best
    options = doc.one("select", id="plan-select").all("option")
    assert [o.attrs["value"] for o in options] == ids
    assert [o.attrs["value"] for o in options if "selected" in o.attrs] == [best]
    files = {a.full_text(): a.attrs["href"] for a in doc.all("a", class_="file")}
    assert files == {n: n for n in ("frontier.json", "frontier.csv", "sensitivity.csv")}


@pytest.mark.parametrize("streamed", [False, True])
def test_the_best_plan_card_says_what_its_held_out_figures_measure(
    tmp_path: Path, streamed: bool
) -> None:
    scope = metrics_scope(streamed=streamed)
    doc = parse(render_report(write_job(tmp_path, scope=scope)).read_text())
    card = next(c for c in doc.all("div", class_="card") if "best plan" in c.full_text())
    assert card.full_text().endswith(f"measured {scope['holdout']}")


def test_a_frontier_without_a_scope_claims_none(tmp_path: Path) -> None:
    doc = parse(render_report(write_job(tmp_path)).read_text())
    card = next(c for c in doc.all("div", class_="card") if "best plan" in c.full_text())
    assert "measured" not in card.full_text()


def test_offline_report_links_every_export_written_beside_it(tmp_path: Path) -> None:
    doc = parse(render_report(write_job(tmp_path)).read_text())
    for point in _frontier(tmp_path)["points"] + _frontier(tmp_path)["uniform"]:
        plan_id = point["plan_id"]
        links = _links(doc, plan_id)
        assert links == {
            "JSON": f"plans/{plan_id}.json",
            "CSV": f"exports/{plan_id}.csv",
            "torchao": f"exports/{plan_id}.torchao.json",
            "llama.cpp": None,  # these layer names have no GGUF tensor name
        }
        plan = read_plan(tmp_path / links["JSON"])
        assert (tmp_path / links["CSV"]).read_text() == plan_to_csv(plan)
        assert (tmp_path / links["torchao"]).read_text() == plan_to_torchao(plan)
    reason = doc.all("span", class_="na")[0].attrs["title"]
    with pytest.raises(InputError) as expected:
        plan_to_llamacpp(plan)
    assert reason == str(expected.value)
    assert not list((tmp_path / "exports").glob("*llamacpp*"))


def test_served_and_offline_reports_offer_the_same_downloads(tmp_path: Path) -> None:
    offline_dir = write_job(tmp_path / "offline", layers=_layers(LLAMA_NAMES))
    served_dir = shutil.copytree(offline_dir, tmp_path / "served")
    offline = parse(render_report(offline_dir).read_text())
    served = parse(render_report(served_dir, links_base="/v1/jobs/j1/").read_text())
    ids = [p["id"] for p in _embedded(offline)["plans"]]
    api = {"JSON": "json", "CSV": "csv", "torchao": "torchao", "llama.cpp": "llamacpp"}
    for plan_id in ids:
        local = _links(offline, plan_id)
        assert set(local) == set(api) and None not in local.values()
        assert local["llama.cpp"] == f"exports/{plan_id}.llamacpp.txt"
        plan = read_plan(offline_dir / local["JSON"])
        assert (offline_dir / local["llama.cpp"]).read_text() == plan_to_llamacpp(plan)
        assert _links(served, plan_id) == {
            label: f"/v1/jobs/j1/plans/{plan_id}?format={fmt}" for label, fmt in api.items()
        }
    files = {a.full_text(): a.attrs["href"] for a in served.all("a", class_="file")}
    # frontier.csv has no API route: no dead link to it.
    assert files == {
        "frontier.json": "/v1/jobs/j1/frontier",
        "sensitivity.csv": "/v1/jobs/j1/sensitivity",
    }
    assert not (served_dir / "exports").exists()  # the API makes exports on request


def test_every_job_string_is_escaped(tmp_path: Path) -> None:
    page = render_report(write_job(tmp_path)).read_text()
    assert EVIL not in page and "</script><img" not in page
    doc = parse(page)
    assert not doc.all("img")  # the evil tag stayed text
    # Parsed back, the text and attributes carry the exact strings.
    assert doc.one("head").one("title").text == f"bitplan report: model {EVIL}"
    rows = doc.one("table", id="heatmap").all("tr", **{"data-layer": LAYERS[2].name})
    assert len(rows) == 1 and rows[0].all("th")[0].attrs["title"] == LAYERS[2].name
    names = [row[0] for row in _embedded(doc)["plans"][0]["layers"]]
    assert names == [lay.name for lay in LAYERS]


def test_long_names_are_clipped_with_the_full_text_as_title(tmp_path: Path) -> None:
    ref = "/data/models/" + "very-long-folder-name/" * 8 + "model.safetensors"
    doc = parse(render_report(write_job(tmp_path, ref=ref)).read_text())
    clipped = [n for n in doc.walk() if "clip" in n.classes()]
    assert all(n.attrs["title"] == n.full_text() for n in clipped)
    assert [n.full_text() for n in clipped].count(ref) == 2  # the header and the model card
    for table in ("heatmap", "sensitivity"):
        heads = doc.one("table", id=table).one("tbody").all("th")
        assert [h.attrs["title"] for h in heads] == [h.full_text() for h in heads]


# --- the plot -----------------------------------------------------------------------------------


def _markers(doc: Node) -> list[Node]:
    return doc.one("svg", id="frontier-plot").all("g")


def _centre(g: Node) -> tuple[float, float]:
    circles = g.all("circle")
    if circles:
        return float(circles[0].attrs["cx"]), float(circles[0].attrs["cy"])
    # A diamond path "Mx y-rLx+r yLx y+rLx-r yZ": its first x and its second y are the centre.
    coords = g.one("path").attrs["d"].strip("MZ").split("L")
    return float(coords[0].split()[0]), float(coords[1].split()[1])


def test_plot_places_points_by_size_and_error(tmp_path: Path) -> None:
    doc = parse(render_report(write_job(tmp_path)).read_text())
    frontier = _frontier(tmp_path)
    centres = {g.attrs["data-plan"]: _centre(g) for g in _markers(doc) if "point" in g.classes()}
    points = frontier["points"]
    assert set(centres) == {p["plan_id"] for p in points}
    by_size = sorted(points, key=lambda p: p["total_bytes"])
    xs = [centres[p["plan_id"]][0] for p in by_size]
    ys = [centres[p["plan_id"]][1] for p in by_size]
    errors = [p["metrics"]["holdout"]["error"] for p in by_size]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    # SVG y grows downwards: a larger error is drawn higher up (smaller y).
    assert [y for _, y in sorted(zip(errors, ys, strict=True))] == sorted(ys, reverse=True)
    # Errors spanning 1e-5..0.5 get a log axis with decade ticks.
    texts = [t.full_text() for t in doc.one("svg").all("text")]
    assert "held-out error (log)" in texts and "1e-5" in texts
    # The polyline joins the frontier points from the smallest to the largest.
    line = doc.one("polyline", class_="frontier").attrs["points"]
    assert [tuple(map(float, pair.split(","))) for pair in line.split()] == list(
        zip(xs, ys, strict=True)
    )


def test_every_point_is_labelled_and_uniform_markers_are_drawn_last(tmp_path: Path) -> None:
    doc = parse(render_report(write_job(tmp_path)).read_text())
    frontier = _frontier(tmp_path)
    markers = _markers(doc)
    kinds = ["uniform" in g.classes() for g in markers]
    # Frontier dots first, uniform diamonds after: later SVG elements paint on top.
    assert kinds == [False] * len(frontier["points"]) + [True] * len(frontier["uniform"])
    labels = {g.attrs["data-plan"]: g.one("text", class_="label").full_text() for g in markers}
    for p in frontier["points"]:  # plan id and bpw, the bpw once even where the id carries it
        label = labels[p["plan_id"]]
        assert label.startswith(p["plan_id"]) and label.count(f"{p['bpw']:.2f}") == 1
    for p in frontier["uniform"]:  # uniform points are labelled with their format
        assert labels[p["plan_id"]] == p["source"].removeprefix("uniform:")
    for g in markers:  # and every marker names its plan in its tooltip
        assert g.one("title").full_text().startswith(g.attrs["data-plan"])


def test_a_uniform_marker_on_a_frontier_point_stays_visible(tmp_path: Path) -> None:
    # The mixed plan and the uniform int4 plan are the same size and error: one spot.
    job = write_job(tmp_path, mixed=[(["int4-g32"] * 3, 0.05), (["int8"] * 3, 1e-5)])
    doc = parse(render_report(job).read_text())
    by_spot: dict[tuple[float, float], list[Node]] = {}
    for g in _markers(doc):
        by_spot.setdefault(_centre(g), []).append(g)
    shared = [gs for gs in by_spot.values() if len(gs) > 1]
    assert shared, "the uniform points should coincide with the frontier points"
    for below, above in shared:
        assert "point" in below.classes() and "uniform" in above.classes()
        assert above.all("path") and not above.all("circle")  # a hollow diamond (see the CSS)
    labels = [g.one("text", class_="label") for gs in shared for g in gs]
    assert len({(t.attrs["x"], t.attrs["y"]) for t in labels}) == len(labels)


def test_budget_line_sits_at_the_budget_size(tmp_path: Path) -> None:
    doc = parse(render_report(write_job(tmp_path, budget="3.2kB")).read_text())
    budget_x = float(doc.one("line", class_="budget").attrs["x1"])
    frontier = _frontier(tmp_path)
    centres = {g.attrs["data-plan"]: _centre(g) for g in _markers(doc)}
    below = [centres[p["plan_id"]][0] for p in frontier["points"] if p["total_bytes"] <= 3200]
    above = [centres[p["plan_id"]][0] for p in frontier["points"] if p["total_bytes"] > 3200]
    assert below and above and max(below) <= budget_x < min(above)
    assert doc.one("text", class_="budget-label").full_text() == "budget 3.2 kB"


def test_job_without_budget_or_sensitivity_still_renders(tmp_path: Path) -> None:
    write_job(tmp_path, budget=None)
    (tmp_path / "sensitivity.csv").unlink()
    doc = parse(render_report(tmp_path).read_text())
    assert not doc.all("line", class_="budget") and not doc.all("table", id="sensitivity")
    section = doc.one("section", id="sensitivity-section")
    assert "has no sensitivity table" in section.full_text()


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
    "--window-size=1400,2400",  # the width the layout must fit
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary (`make test` installs it). Missing: a visible skip, except in CI
    (CI=true), where the browser test must run."""
    found = shutil.which("chromium")
    if found is None:
        message = "Chromium is not installed (`make test` installs it with apt-get as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must run the browser test")
        pytest.skip(message)
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


# Appended to a copy of the report: measures the laid-out page after report.js ran and leaves
# the numbers in a <pre> for --dump-dom to carry out.
PROBE = """<script>
(function () {
  function box(n) { return n.getBoundingClientRect(); }
  function hit(a, b) {
    return a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  }
  var labels = Array.from(document.querySelectorAll("#frontier-plot text.label")).map(box);
  var marks = Array.from(document.querySelectorAll("#frontier-plot circle, #frontier-plot path"));
  var clashes = 0;
  labels.forEach(function (a, i) {
    labels.forEach(function (b, j) { if (i < j && hit(a, b)) clashes++; });
    marks.forEach(function (m) { if (hit(a, box(m))) clashes++; });
  });
  var cut = Array.from(document.querySelectorAll("section, .card")).filter(function (s) {
    return s.scrollWidth > s.clientWidth;
  }).map(function (s) { return s.id || s.className; });
  var wrap = document.getElementById("heatmap-wrap"), sel = wrap.querySelector("th.col.sel");
  var w = box(wrap), c = box(sel);
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({
    labels: labels.length, clashes: clashes, cut: cut,
    page_overflow: document.documentElement.scrollWidth - window.innerWidth,
    heatmap_scrolls: wrap.scrollWidth > wrap.clientWidth,
    selected_in_view: c.left >= w.left && c.right <= w.left + wrap.clientWidth,
    clip_heights: Array.from(document.querySelectorAll(".clip")).map(function (n) {
      return box(n).height;
    }),
    detail_rows: document.querySelectorAll("#plan-layers tbody tr").length
  });
  document.body.appendChild(pre);
})();
</script>"""


def _crowded_job(job_dir: Path) -> Path:
    """A job that used to break the layout: a long model path, long layer names and many
    frontier points, the preselected (best) one the rightmost heatmap column."""
    names = tuple(
        f"model.encoder.layers.{i}.attention.self_attention.query_key_value.projection"
        for i in range(3)
    )
    layers = _layers(names)
    # Every assignment of three formats to three layers, errors falling as plans grow.
    combos = [[a, b, c] for a in FORMATS for b in FORMATS for c in FORMATS]
    combos.sort(key=lambda f: _plan(layers, f, 0.0, None, "").totals.total_bytes)
    mixed = [(f, 0.3 * 0.7**rank) for rank, f in enumerate(combos)]
    ref = "/home/someone/checkpoints/" + "a-rather-long-experiment-folder/" * 6 + "model"
    return write_job(job_dir, layers=layers, mixed=mixed, ref=ref)


def test_chromium_renders_a_crowded_report_that_fits_1400px(tmp_path: Path, chromium: str) -> None:
    job = _crowded_job(tmp_path / "job")
    report = render_report(job)
    source = parse(report.read_text())
    assert not [n for n in source.walk() if n.attrs.get("id") == "plan-layers"]
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = parse(_chromium(chromium, tmp_path / "profile", "--dump-dom", probed.as_uri()))
    probe = json.loads(dom.one("pre", id="probe").text)
    plans = _embedded(source)["plans"]
    # The script ran: it built the selected plan's layer table and marked that plan.
    assert probe["detail_rows"] == 3
    selected = _embedded(source)["selected"]
    (point,) = [g for g in dom.all("g") if g.attrs.get("data-plan") == selected]
    assert "selected" in point.classes()
    assert [td for td in dom.all("td") if "chosen" in td.classes()]
    # Layout at 1400 px: labels clear of each other and of markers, nothing sticks out of its
    # section or card, the page never scrolls sideways, the heatmap scrolls inside its box with
    # the selected column shown, long values stay on one line.
    assert probe["labels"] >= len(plans) // 2 and probe["clashes"] == 0
    assert probe["cut"] == [] and probe["page_overflow"] <= 0
    assert probe["heatmap_scrolls"] and probe["selected_in_view"]
    assert probe["clip_heights"] and max(probe["clip_heights"]) < 30
    shot = tmp_path / "report.png"
    _chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", report.as_uri())
    assert shot.stat().st_size > 10_000  # a real page, not a blank canvas
