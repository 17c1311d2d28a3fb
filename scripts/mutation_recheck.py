"""Re-run the survivors of the last `make mutation` against today's tests, a module's own test files only.

Why: mutmut keeps a survivor's verdict until its function changes, and picks the tests it runs for a
mutant from its call-statistics pass. Tests written after a run are not run against its survivors,
and a module-scoped fixture's calls (the app start-up) are credited to the first test that uses it
only. So a survivor of a run can be killed by a test written since, or by a test mutmut never picked
for it. This runs each survivor (mutmut's own mutant files in mutants/, selected by
MUTANT_UNDER_TEST, as mutmut does) against the test files named below for its module, stopping at
the first failure, and writes the verdicts to mutants/recheck.json; scripts/mutation_report.py
counts a survivor killed here as killed.

    python scripts/mutation_recheck.py [--only app.batching ...] [--tests tests/test_x.py ...]

A survivor that survives here again stays a survivor; `--tests` narrows the files run (faster, and a
kill found with fewer tests is still a kill).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from mutation_report import run_statuses  # scripts/ is on the path when run as a script

REPO = Path(__file__).resolve().parents[1]
MUTANTS = REPO / "mutants"
TESTS_FOR = {
    "app.batching": ["tests/test_batching.py", "tests/test_concurrency.py"],
    "app.inputs": ["tests/test_inputs.py", "tests/test_limits.py", "tests/test_api.py"],
    "app.imaging": ["tests/test_preprocessing.py", "tests/test_api.py"],
    "app.inference": ["tests/test_api.py", "tests/test_anomaly.py", "tests/test_fitted_score.py"],
    "app.artifacts": ["tests/test_artifact.py", "tests/test_latent_map.py", "tests/test_anomaly.py"],
    "app.contract": ["tests/test_artifact.py", "tests/test_latent_map.py", "tests/test_anomaly.py"],
    "app.middleware": ["tests/test_limits.py", "tests/test_api.py", "tests/test_draining.py"],
    "app.preprocess": ["tests/test_preprocessing.py", "tests/test_hostile.py"],
    "app.access": ["tests/test_access.py"],
    "app.decoders": ["tests/test_decoders.py", "tests/test_hostile.py"],
    "app.protocol.codec": ["tests/test_protocol.py", "tests/test_hostile.py"],
    "app.draining": ["tests/test_draining.py"],
    "app.api.deps": ["tests/test_draining.py", "tests/test_api.py"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="mutant names, or module prefixes such as app.batching")
    parser.add_argument("--tests", nargs="*", default=[], help="test files or ids to run instead of the module's")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant (a hang counts as killed)")
    args = parser.parse_args(argv)
    if not MUTANTS.is_dir():
        print("no mutants/: run `make mutation` first", file=sys.stderr)
        return 1
    for test in (REPO / "tests").glob("*.py"):  # today's tests, next to mutmut's copy of the code
        shutil.copy(test, MUTANTS / "tests" / test.name)
    out = MUTANTS / "recheck.json"
    verdicts: dict[str, str] = json.loads(out.read_text()) if out.is_file() else {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAE_THREADS": "1", "PYTEST_TIMEOUT": "20"}
    for name in [k for statuses in run_statuses().values() for k, s in statuses.items() if s == "survived"]:
        module = name.rsplit(".", 1)[0]
        if args.only and not any(name == p or name.startswith(p + ".") for p in args.only):
            continue
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
               *(args.tests or TESTS_FOR[module])]
        try:
            rc = subprocess.run(cmd, cwd=MUTANTS, env={**env, "MUTANT_UNDER_TEST": name}, capture_output=True,
                                timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        verdicts[name] = "survived" if rc == 0 else "killed"
        print(f"{verdicts[name]:8} {name}", flush=True)
        out.write_text(json.dumps(verdicts, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
