"""One process of a shared measured search, for tests/app/test_search_peers.py.

``python -m tests.app._shared_study_worker URL STUDY SEED TRIALS PAUSE_S OUT`` runs
:func:`~bitplan.search.measured.measured_search` on the synthetic problem of
tests/search/test_measured.py with a pause in every evaluation (so that several processes
overlap), on Optuna study STUDY of storage URL (heartbeat 1 s, grace 2 s), and writes the trial
numbers it saw and its process id to OUT as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bitplan.search.measured import measured_search, rdb_storage
from bitplan.search.points import Choice
from tests.search.test_measured import FULL, GROUP_BYTES, OPTIONS, synthetic_error


def main(argv: list[str]) -> None:
    url, study, seed, trials, pause_s, out = argv
    measured = 0

    def evaluate(choice: Choice) -> float:
        nonlocal measured
        measured += 1
        time.sleep(float(pause_s))
        return synthetic_error(choice)

    storage = rdb_storage(url, heartbeat_s=1, grace_s=2)
    result = measured_search(
        options=OPTIONS,
        group_bytes=GROUP_BYTES,
        cap_bytes=FULL // 2,
        evaluate=evaluate,
        trials=int(trials),
        seed=int(seed),
        storage=storage,
        study_name=study,
    )
    Path(out).write_text(
        json.dumps(
            {
                "trials": [p.number for p in result.trials],
                "pareto": [[p.planned_bytes, p.error] for p in result.pareto],
                "measured": measured,
                "interrupted": result.interrupted,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
