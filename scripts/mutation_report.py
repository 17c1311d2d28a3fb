"""Per-module mutation scores from the last `make mutation` run (mutmut's mutants/**/*.py.meta).

Killed = the fast tests went red (a failing test, or a timeout: the mutant hung them);
survived = every test still passed. A survivor that scripts/mutation_recheck.py has since seen
killed by today's tests (mutants/recheck.json) counts as killed, in its own column. Prints a
Markdown table and the surviving mutants' names (`mutmut show NAME` prints the change), for
docs/testing.md.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

REPO = Path(__file__).resolve().parents[1]


def run_statuses() -> dict[str, dict[str, str]]:
    """mutmut's verdict on each mutant, by module file (app/batching.py: {name: status})."""
    return {str(meta.relative_to(REPO / "mutants")).removesuffix(".meta"):
            {k: status_by_exit_code[v] for k, v in json.loads(meta.read_text())["exit_code_by_key"].items()}
            for meta in sorted((REPO / "mutants").glob("app/**/*.py.meta"))}


def main() -> int:
    runs = run_statuses()
    if not runs:
        print("no mutation results: run `make mutation` first", file=sys.stderr)
        return 1
    recheck_file = REPO / "mutants" / "recheck.json"
    recheck = json.loads(recheck_file.read_text()) if recheck_file.is_file() else {}
    rows, survivors, total = [], [], Counter()
    for module, statuses in runs.items():
        statuses = {k: "killed since" if s == "survived" and recheck.get(k) == "killed" else s
                    for k, s in statuses.items()}
        count = Counter("killed" if s in ("killed", "timeout") else s for s in statuses.values())
        if not statuses:
            continue
        total.update(count)
        killed = count["killed"] + count["killed since"]
        tested = killed + count["survived"]
        score = 100 * killed / tested if tested else 0.0
        rows.append(f"| `{module}` | {len(statuses)} | {count['killed']} | {count['killed since']} | "
                    f"{count['survived']} | {count['no tests'] + count['not checked'] + count['skipped']} | "
                    f"{score:.1f}% |")
        survivors += [k for k, s in statuses.items() if s == "survived"]
    killed = total["killed"] + total["killed since"]
    tested = killed + total["survived"]
    print("| module | mutants | killed in the run | killed since | survived | not run | score |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"| all | {sum(total.values())} | {total['killed']} | {total['killed since']} | {total['survived']} | "
          f"{total['no tests'] + total['not checked'] + total['skipped']} | {100 * killed / max(tested, 1):.1f}% |")
    print("\nsurvivors:" if survivors else "\nno survivors")
    for name in survivors:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
