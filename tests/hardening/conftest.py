"""Shared by the hardening tests: a counter of fuzz cases, reported at the end of the run."""

from __future__ import annotations

import collections

import pytest

_COUNTS_KEY = pytest.StashKey[collections.Counter]()


def pytest_configure(config):
    config.stash[_COUNTS_KEY] = collections.Counter()


@pytest.fixture(scope="session")
def fuzz_counter(pytestconfig) -> collections.Counter:
    """``counter[(target, outcome)] += 1`` for every fuzz case run."""
    return pytestconfig.stash[_COUNTS_KEY]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = config.stash.get(_COUNTS_KEY, None)
    if not counts:
        return
    total = sum(counts.values())
    by_target: dict[str, dict[str, int]] = {}
    for (target, outcome), n in sorted(counts.items()):
        by_target.setdefault(target, {})[outcome] = n
    terminalreporter.section("onnxq fuzz summary")
    for target, outcomes in by_target.items():
        detail = ", ".join(f"{k} {v}" for k, v in outcomes.items())
        terminalreporter.write_line(f"{target}: {sum(outcomes.values())} cases ({detail})")
    failed = len(terminalreporter.stats.get("failed", []))
    terminalreporter.write_line(
        f"fuzz cases run: {total}; crashes (failed tests): {failed}"
    )
