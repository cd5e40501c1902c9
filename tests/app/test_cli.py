"""The planning commands of the `bitplan` CLI: output files, summaries, exit codes, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from bitplan.app.cli import app
from bitplan.app.console import CTRL_C_EXIT
from bitplan.search import pipeline
from bitplan.search.artifact import load_artifact, tensor_bytes_of
from bitplan.search.plans import read_frontier, read_plan
from bitplan.search.spec import JobSpec
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.models import load_model
from bitplan.sensitivity.progress import ProgressFn
from tests.helpers import SENTENCES, uniform_plan
from tests.runtimes import require_runtime

runner = CliRunner()


@pytest.fixture(autouse=True)
def _restore_quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI quiets Hugging Face through environment variables; undo that after each test."""
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)


def _files_written(output: str) -> int:
    """The plan-file count a command printed (``… (N files)``)."""
    found = re.search(r"\((\d+) files\)", output)
    assert found, output
    return int(found[1])


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_formats_lists_bits_per_weight() -> None:
    out = _ok(["formats"])
    assert "int4-g128" in out and "4.125" in out and "fp8-e4m3" in out


def test_analyze_writes_table_and_prints_summary(tmp_path: Path) -> None:
    out = _ok(
        [
            "analyze",
            "builtin:digits-cnn",
            "--calib",
            "builtin",
            "--method",
            "weight",
            "-o",
            str(tmp_path),
            "--device",
            "cpu",
        ]
    )
    table = pd.read_csv(tmp_path / "sensitivity.csv")
    assert set(table["format"]) == {"int8", "int6-g128", "int4-g128", "int3-g64", "int2-g32-asym"}
    assert len(table) == 6 * 5
    assert "conv1" in out and "sensitivity.csv" in out
    assert json.loads((tmp_path / "layers.json").read_text())


@pytest.fixture
def fisher_misses_fc2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fisher scores every layer of builtin:digits-cnn but fc2, as if no gradient reached it,
    so the analyzer's fallback scores fc2; the doctored table never enters the shared cache."""
    from bitplan.sensitivity import analyzer

    real = analyzer.fisher_errors

    def misses_fc2(*args: Any, **kwargs: Any) -> dict[str, dict[str, float]]:
        scores = real(*args, **kwargs)
        del scores["fc2"]
        return scores

    monkeypatch.setattr(analyzer, "fisher_errors", misses_fc2)
    monkeypatch.setattr(analyzer, "load_cached", lambda *_: None)
    monkeypatch.setattr(analyzer, "store_cached", lambda *_: None)


@pytest.mark.usefixtures("fisher_misses_fc2")
def test_analyze_and_search_show_which_layers_a_fallback_scored(tmp_path: Path) -> None:
    common = ["--method", "fisher", "--device", "cpu", "--batch-size", "256"]
    analyzed = _ok(["analyze", "builtin:digits-cnn", *common, "-o", str(tmp_path / "sens")])
    assert "fc2 †" in analyzed and "conv1 †" not in analyzed
    note = "† fisher could not score 1 layer (no gradient reached it); scored instead by layer: fc2"
    assert note in " ".join(analyzed.split())  # the terminal wraps the line
    searched = _ok(
        ["search", "builtin:digits-cnn", "--budget", "4.5bpw", "--trials", "2", *common]
        + ["-o", str(tmp_path / "job")]
    )
    assert note in " ".join(searched.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyze", "builtin:nope", "-o", "x"], "builtin"),
        (["analyze", "builtin:digits-cnn", "--formats", "int7", "-o", "x"], "accepted"),
        (["analyze", "builtin:digits-cnn", "--method", "magic", "-o", "x"], "accepted"),
        (["analyze", "builtin:digits-cnn", "--pin", "fc1", "-o", "x"], "PATTERN=FORMAT"),
        (["search", "builtin:digits-cnn", "--budget", "lots", "-o", "x"], "accepted"),
        (
            ["search", "builtin:digits-cnn", "--budget", "0.5bpw", "-o", "x", "--device", "cpu"],
            "smallest reachable size",
        ),
        (["solve", "missing.csv", "-o", "x"], "missing.csv"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_search_then_apply_writes_exact_bytes(tmp_path: Path) -> None:
    out = _ok(
        [
            "search",
            "builtin:digits-cnn",
            "--budget",
            "4.5bpw",
            "--trials",
            "6",
            "--device",
            "cpu",
            "--batch-size",
            "256",
            "--rounding",
            "rtn,gptq",
            "-o",
            str(tmp_path / "job"),
        ]
    )
    assert "Pareto frontier" in out and "u-int8" in out
    assert "proxy vs measured over" in out  # how far the table's sum was from the measurements
    assert _files_written(out) == len(list((tmp_path / "job" / "plans").glob("*.json")))
    frontier = json.loads((tmp_path / "job" / "frontier.json").read_text())
    # A frontier plan that rounds some layer by gptq: apply finds the job's rounding statistics
    # beside plans/ by itself.
    paths = [tmp_path / "job" / point["plan"] for point in frontier["points"]]
    rounded = [p for p in paths if "gptq" in {lay.rounding for lay in read_plan(p).layers}]
    assert rounded, "no frontier plan took gptq"
    plan_path = rounded[-1]
    _ok(["apply", "builtin:digits-cnn", str(plan_path), "-o", str(tmp_path / "packed")])
    plan = read_plan(plan_path)
    assert tensor_bytes_of(tmp_path / "packed" / "model.safetensors") == plan.totals.total_bytes
    fresh = load_model("builtin:digits-cnn", device="cpu")
    load_artifact(tmp_path / "packed", fresh.module)


def test_apply_to_torchao_writes_a_transformers_folder(
    tiny_hf_model: Callable[..., Path], tmp_path: Path
) -> None:
    require_runtime("torchao")
    folder = tiny_hf_model("llama", task="text-generation")
    model = load_model(str(folder), device="cpu")
    plan = uniform_plan(model, "int4-g16")
    plan_path = plan.write(tmp_path / "plan.json")
    out = _ok(["apply", str(folder), str(plan_path), "--to", "torchao", "-o", str(tmp_path / "ao")])
    assert f"plan total_bytes {plan.totals.total_bytes}" in out
    config = json.loads((tmp_path / "ao" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert (tmp_path / "ao" / "model.safetensors").is_file()

    nowhere = tmp_path / "nope"
    bad = runner.invoke(
        app, ["apply", str(folder), str(plan_path), "--to", "nope", "-o", str(nowhere)]
    )
    assert bad.exit_code == 2
    assert "unknown target 'nope'; accepted: bitplan, torchao" in bad.output.replace("\n", " ")
    assert not nowhere.exists()


def test_apply_to_compressed_tensors_writes_a_vllm_folder(
    tiny_hf_model: Callable[..., Path], tmp_path: Path
) -> None:
    """A tiny LLaMA, its embedding and LM head left out (vLLM keeps the head unquantized)."""
    require_runtime("compressed_tensors")
    folder = tiny_hf_model("llama", task="text-generation")
    model = load_model(str(folder), device="cpu", exclude=["lm_head", "model.embed_tokens"])
    plan = uniform_plan(model, "int4-g16")
    plan_path = plan.write(tmp_path / "plan.json")
    out_dir = tmp_path / "ct"
    out = _ok(
        ["apply", str(folder), str(plan_path), "--to", "compressed-tensors", "-o", str(out_dir)]
    )
    on_disk = tensor_bytes_of(out_dir / "model.safetensors")
    assert f"wrote {out_dir}: {on_disk} tensor bytes" in " ".join(out.split())
    assert f"plan total_bytes {plan.totals.total_bytes}" in out
    qc = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    (group,) = qc["config_groups"].values()  # one format, one config group
    assert (group["weights"]["num_bits"], group["weights"]["group_size"]) == (4, 16)
    assert sorted(group["targets"]) == sorted(lay.name for lay in model.layers)
    assert read_plan(out_dir / "plan.json") == plan


@pytest.mark.parametrize(
    ("to", "package"),
    [("torchao", "torchao"), ("gguf", "gguf"), ("compressed-tensors", "compressed_tensors")],
)
def test_apply_without_the_runtime_packages_says_how_to_install_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, to: str, package: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # importing it now fails, as if missing
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["apply", "builtin:tiny-lm", "plan.json", "--to", to, "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"`--to {to}` needs the runtime packages: pip install 'bitplan[runtimes]'" in message
    assert "Traceback" not in result.output
    assert not out.exists()


def test_search_with_fuse_gives_q_k_v_one_format_in_every_plan(tmp_path: Path) -> None:
    """Block 0's v is pinned: fusion must carry the pin to its q and k in every plan (search,
    exact and uniform alike). Blocks 1-3 are free: the search picks one format per q/k/v
    group. Without fusion, q, k and v would take whatever their own sensitivity says."""
    out = tmp_path / "job"
    _ok(
        [
            "search",
            "builtin:tiny-lm",
            "--budget",
            "6bpw",
            "--fuse",
            "qkv",
            "--pin",
            "blocks.0.attn.v_proj=int8",
            "--method",
            "weight",
            "--trials",
            "6",
            "--max-samples",
            "16",
            "--device",
            "cpu",
            "-o",
            str(out),
        ]
    )
    qkv_names = ("q_proj", "k_proj", "v_proj")
    frontier = read_frontier(out / "frontier.json")
    assert frontier.points and len(frontier.uniform) > 1
    free_formats = set()  # the formats the search gave the free groups
    for point in frontier.points + frontier.uniform:
        plan = read_plan(out / point.plan)
        for block in range(4):  # builtin:tiny-lm has 4 blocks
            attn = f"blocks.{block}.attn"
            members = [lay for lay in plan.layers if lay.name.startswith(f"{attn}.")]
            qkv = [lay for lay in members if lay.name[-6:] in qkv_names]
            assert [lay.share for lay in qkv] == [f"{attn}.qkv"] * 3
            formats = {lay.format.name for lay in qkv}
            assert len(formats) == 1, (point.plan_id, attn, formats)
            if block == 0:
                assert formats == {"int8"}, point.plan_id
            elif point in frontier.points:
                free_formats |= formats
        others = [lay for lay in plan.layers if lay.name[-6:] not in qkv_names]
        assert others and all(lay.share is None for lay in others)
    assert free_formats - {"int8"}, free_formats  # the pin did not spread to other blocks
    # layers.json lists the layers as planned, share groups included.
    shares = {lay["name"]: lay["share"] for lay in json.loads((out / "layers.json").read_text())}
    assert shares["blocks.2.attn.k_proj"] == "blocks.2.attn.qkv"
    assert shares["blocks.2.attn.o_proj"] is None
    assert sum(share is not None for share in shares.values()) == 4 * 3


def test_solve_on_a_user_table(tmp_path: Path) -> None:
    rows = [
        {"layer": f"l{i}", "format": f, "error": e * (i + 1), "numel": 4096}
        for i in range(4)
        for f, e in (("int8", 0.01), ("int4-g128", 0.2), ("int2-g32", 1.0))
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    out = _ok(["solve", str(tmp_path / "t.csv"), "--budget", "5bpw", "-o", str(tmp_path / "o")])
    assert "best under 5bpw" in out
    assert _files_written(out) == len(list((tmp_path / "o" / "plans").glob("*.json")))
    frontier = json.loads((tmp_path / "o" / "frontier.json").read_text())
    assert frontier["points"] and all(
        (tmp_path / "o" / p["plan"]).is_file() for p in frontier["points"]
    )


def _capture(monkeypatch: pytest.MonkeyPatch, name: str) -> list[JobSpec]:
    """Replace the pipeline function ``name`` by one that records its spec and fails."""
    seen: list[JobSpec] = []

    def fake(spec: JobSpec, **_: Any) -> None:
        seen.append(spec)
        raise InputError("stopped by the test")

    monkeypatch.setattr(pipeline, name, fake)
    return seen


@pytest.mark.parametrize(
    ("args", "function", "budget"),
    [
        (["analyze", "builtin:digits-cnn"], "analyze_spec", "16bpw"),
        (["search", "builtin:digits-cnn", "--budget", "3bpw"], "run_job", "3bpw"),
    ],
)
def test_commands_take_their_defaults_from_jobspec(
    args: list[str], function: str, budget: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _capture(monkeypatch, function)
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "stopped by the test" in result.output
    assert seen == [JobSpec(model="builtin:digits-cnn", budget=budget)]


def test_a_failed_command_removes_the_folders_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fails_after_writing(spec: JobSpec, *, out_dir: Path, **_: Any) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "sensitivity.csv").write_text("layer,format,error\n")
        raise InputError("the model does not load")

    monkeypatch.setattr(pipeline, "run_job", fails_after_writing)
    new = tmp_path / "new" / "job"
    result = runner.invoke(
        app, ["search", "builtin:digits-cnn", "--budget", "4bpw", "-o", str(new)]
    )
    assert result.exit_code == 2
    assert not (tmp_path / "new").exists()
    # A folder that was there before is the user's: left as it was found (plus what was written).
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    result = runner.invoke(
        app, ["search", "builtin:digits-cnn", "--budget", "4bpw", "-o", str(kept)]
    )
    assert result.exit_code == 2 and (kept / "notes.txt").read_text() == "mine"


def test_missing_model_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "job"
    result = runner.invoke(
        app, ["search", "builtin:nope", "--budget", "4bpw", "-o", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 2 and "builtin" in result.output
    assert not out.exists()


@pytest.fixture
def interactive_sigint() -> Iterator[None]:
    """Ctrl-C as a terminal delivers it: Python's own SIGINT handler. A test run started in the
    background by a shell (`cmd &`) inherits SIGINT ignored, and the command rightly leaves an
    ignored Ctrl-C ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupting(stage: str, after: int) -> Callable[..., pipeline.JobResult]:
    """The real run_job, with Ctrl-C (a real SIGINT) pressed once ``stage`` reports ``after``."""
    real = pipeline.run_job

    def run_job(spec: JobSpec, *, progress: ProgressFn, **kwargs: Any) -> pipeline.JobResult:
        pressed = False

        def press_ctrl_c(name: str, done: int, total: int) -> None:
            nonlocal pressed
            progress(name, done, total)
            if name == stage and done >= after and not pressed:
                pressed = True
                signal.raise_signal(signal.SIGINT)

        return real(spec, progress=press_ctrl_c, **kwargs)

    return run_job


def test_ctrl_c_in_the_search_keeps_the_finished_trials_and_exits_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interactive_sigint: None
) -> None:
    monkeypatch.setattr(pipeline, "run_job", _interrupting("search", after=2))
    out = tmp_path / "job"
    args = ["search", "builtin:digits-cnn", "--budget", "4.5bpw", "--method", "weight"]
    result = runner.invoke(app, [*args, "--trials", "40", "--device", "cpu", "-o", str(out)])
    assert result.exit_code == CTRL_C_EXIT, result.output
    assert "search stopped early" in result.output
    frontier = read_frontier(out / "frontier.json")
    assert frontier.points
    assert _files_written(result.output) == len(list((out / "plans").glob("*.json")))
    # The command's Ctrl-C watch is gone: Python's own handler is back.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_before_the_search_exits_130_and_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interactive_sigint: None
) -> None:
    monkeypatch.setattr(pipeline, "run_job", _interrupting("load", after=1))
    out = tmp_path / "job"
    args = ["search", "builtin:digits-cnn", "--budget", "4.5bpw", "--method", "weight"]
    result = runner.invoke(app, [*args, "--device", "cpu", "-o", str(out)])
    assert result.exit_code == CTRL_C_EXIT, result.output
    assert "interrupted" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_hugging_face_progress_bars_stay_out_of_search_and_apply(
    tiny_hf_model: Callable[..., Path], tmp_path: Path
) -> None:
    """In a fresh process, as a user runs it: transformers is imported after the CLI started."""
    folder = tiny_hf_model("bert", task="feature-extraction")
    data = tmp_path / "calib.txt"
    data.write_text("\n".join(SENTENCES))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_", "TRANSFORMERS_"))}
    bitplan = [sys.executable, "-m", "bitplan.app.cli"]
    search = subprocess.run(
        [*bitplan, "search", str(folder), "--budget", "8bpw", "--calib", str(data)]
        + ["--method", "weight", "--trials", "1", "--device", "cpu", "-o", str(tmp_path / "job")],
        env=env, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr
    plan = tmp_path / "job" / read_frontier(tmp_path / "job" / "frontier.json").points[0].plan
    applied = subprocess.run(
        [*bitplan, "apply", str(folder), str(plan), "-o", str(tmp_path / "packed")],
        env=env, capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert "tensor bytes" in applied.stdout
    for run in (search, applied):
        assert "Loading weights" not in run.stderr and "it/s]" not in run.stderr, run.stderr
    assert applied.stderr == ""
