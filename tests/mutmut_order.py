"""A pytest plugin for mutation runs (tests/MUTATION.md), loaded with `-p tests.mutmut_order`.

It runs the tests listed in tests/mutmut_original_tests.txt (the suite before the new tests) first, fastest first
(mutmut's measured durations), then the new ones; with `-x` the first failure ends the run, so a mutant's killing
test is an original one whenever any original test kills it. Each kill is appended to mutmut_kills.log as
"mutant <tab> test <tab> original|new": one run gives the score before and after the new tests."""

import json
import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_LIST = _ROOT / "tests" / "mutmut_original_tests.txt"
ORIGINAL = set(_LIST.read_text().splitlines()) if _LIST.exists() else set()
_NOT_MUTANTS = ("", "stats", "fail", "list_all_tests", "mutant_generation")


def pytest_collection_modifyitems(session, config, items):
    stats = _ROOT / "mutmut-stats.json"
    durations = json.loads(stats.read_text()).get("duration_by_test", {}) if stats.exists() else {}
    items.sort(key=lambda item: (item.nodeid not in ORIGINAL, durations.get(item.nodeid, 5.0)))


def pytest_runtest_logreport(report):
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if report.failed and mutant not in _NOT_MUTANTS:
        kind = "original" if report.nodeid in ORIGINAL else "new"
        with open(_ROOT / "mutmut_kills.log", "a") as f:
            f.write(f"{mutant}\t{report.nodeid}\t{kind}\n")
