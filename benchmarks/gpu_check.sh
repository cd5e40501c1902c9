#!/usr/bin/env bash
# The CUDA path's check, in one go, on a machine with a CUDA GPU: the tests marked gpu (with
# BITPLAN_REQUIRE_GPU=1, so a missing device fails them instead of skipping), then the per-stage
# figures of CUDA against the CPU (python -m benchmarks.gpu_stages). A few minutes once the
# Python environment is there; every step's output lands in OUT_DIR too.
#
#   bash benchmarks/gpu_check.sh
#
# Python: BITPLAN_PYTHON when set; else python3 when its torch is a CUDA build (a GPU machine's
# image usually has one: it is used as it is); else a venv of its own, out/gpu-venv. Into that
# environment pip installs what pyproject.toml asks for (dependencies, the hf extra, pytest),
# keeping whatever already satisfies it, a CUDA torch included. Where no torch is installed,
# pip's default torch is the one PyPI serves for Linux x86-64, a CUDA build; the Makefile's
# .venv pins a CPU build, so it is never used here. Offline, give pip a folder of wheels for
# what is missing: PIP_NO_INDEX=1 PIP_FIND_LINKS=wheels/ bash benchmarks/gpu_check.sh. bitplan
# itself is not installed: a tree of links with the installed layout (bitplan/app -> app, ...,
# as `make typecheck` builds) goes on PYTHONPATH, so no build step runs.
#
# Environment: OUT_DIR (default out/gpu-check) for pytest.log, junit.xml, figures.md and
# figures.json; GPU_CHECK_TRIALS (default 20) for the figures' jobs; BITPLAN_CACHE_DIR (default
# pytest's model cache, .pytest_cache/d/bitplan-models, which the tests fill) for the trained
# builtin models, so the figures reuse what the tests trained. Exit status: the tests'.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR="${OUT_DIR:-out/gpu-check}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "Python with a CUDA build of torch"
PY="${BITPLAN_PYTHON:-}"
if [ -z "$PY" ]; then
    if python3 -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
        PY=python3
    else
        [ -x out/gpu-venv/bin/python ] || python3 -m venv out/gpu-venv || exit 1
        PY=out/gpu-venv/bin/python
    fi
fi
echo "using $PY ($("$PY" --version 2>&1))"
mapfile -t REQUIREMENTS < <("$PY" - <<'EOF'
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["hf"]:
    print(requirement)
print("pytest>=8.0")
print("pytest-timeout>=2.3")
EOF
)
"$PY" -m pip install --quiet --disable-pip-version-check "${REQUIREMENTS[@]}" || {
    echo "pip could not provide: ${REQUIREMENTS[*]} (offline? see the header of $0)"
    exit 1
}
"$PY" - <<'EOF' || exit 1
import sys

import torch

print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: this check needs one (and a CUDA build of torch)")
for i in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB")
EOF

SITE="$PWD/out/gpu-check-site"  # beside OUT_DIR, which holds only the logs
rm -rf "$SITE" && mkdir -p "$SITE/bitplan"
for f in bitplan/*.py; do ln -s "$PWD/$f" "$SITE/bitplan/"; done
for pkg in app search sensitivity migrations; do ln -s "$PWD/$pkg" "$SITE/bitplan/$pkg"; done
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export BITPLAN_CACHE_DIR="${BITPLAN_CACHE_DIR:-$PWD/.pytest_cache/d/bitplan-models}"

step "tests marked gpu (BITPLAN_REQUIRE_GPU=1)"
BITPLAN_REQUIRE_GPU=1 "$PY" -m pytest -q -m gpu tests/gpu -rP --durations=10 \
    --junitxml="$OUT_DIR/junit.xml" 2>&1 | tee "$OUT_DIR/pytest.log"
tests_status=${PIPESTATUS[0]}

step "per-stage figures, CUDA against the CPU"
"$PY" -m benchmarks.gpu_stages --trials "${GPU_CHECK_TRIALS:-20}" \
    --json "$OUT_DIR/figures.json" 2>&1 | tee "$OUT_DIR/figures.md"

step "done: tests exit status $tests_status; logs in $OUT_DIR"
exit "$tests_status"
