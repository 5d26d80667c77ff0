"""The skip policy: under CI (CI=true, as `.ci/run` is run) a skipped test fails the run and is named."""
from __future__ import annotations

import pytest

PASSES = "def test_runs():\n    pass\n"
SKIPS = PASSES + "\n\n@__import__('pytest').mark.skip(reason='hides a failure')\ndef test_skipped():\n    pass\n"


@pytest.mark.parametrize("ci, source, code", [("true", SKIPS, pytest.ExitCode.TESTS_FAILED),
                                              ("", SKIPS, pytest.ExitCode.OK),
                                              ("true", PASSES, pytest.ExitCode.OK)], ids=["ci", "local", "ci-clean"])
def test_a_skip_fails_only_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, source: str,
                                    code: pytest.ExitCode) -> None:
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_policy=source)
    result = pytester.runpytest_inprocess("-p", "tests.conftest", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=int(source == SKIPS))
    assert result.ret == code
    if code != pytest.ExitCode.OK:
        result.stdout.fnmatch_lines(["*skipped tests fail under CI*", "test_policy.py::test_skipped: *hides a failure"])
