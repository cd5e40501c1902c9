"""The PostgreSQL gate of ``tests/app/conftest.py``: skip with a reason locally, fail in CI."""

from __future__ import annotations

import pytest

from tests.app.conftest import in_ci, postgres_unreachable


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"CI": ""}, False),
        ({"CI": "false"}, False),
        ({"CI": "true"}, True),
        ({"CI": "True"}, True),
        ({"CI": "1"}, True),
    ],
)
def test_in_ci_reads_the_ci_variable(environ: dict[str, str], expected: bool) -> None:
    assert in_ci(environ) is expected


def test_an_unreachable_server_skips_with_its_reason_outside_ci() -> None:
    with pytest.raises(pytest.skip.Exception, match="not reachable: connection refused"):
        postgres_unreachable("connection refused", environ={})


def test_an_unreachable_server_fails_under_ci_true() -> None:
    with pytest.raises(pytest.fail.Exception, match="not reachable: connection refused.*CI=true"):
        postgres_unreachable("connection refused", environ={"CI": "true"})
