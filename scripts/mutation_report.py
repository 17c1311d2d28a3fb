"""Per-module mutation scores from the last `make mutation` run (mutmut's mutants/**/*.py.meta).

Killed = the fast tests went red (a failing test, or a timeout: the mutant hung them);
survived = every test still passed. Prints a Markdown table and the surviving mutants'
names (`mutmut show NAME` prints the change), for docs/testing.md.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    metas = sorted((REPO / "mutants").glob("app/**/*.py.meta"))
    if not metas:
        print("no mutation results: run `make mutation` first", file=sys.stderr)
        return 1
    rows, survivors, total = [], [], Counter()
    for meta in metas:
        module = str(meta.relative_to(REPO / "mutants")).removesuffix(".meta")
        statuses = {k: status_by_exit_code[v] for k, v in json.loads(meta.read_text())["exit_code_by_key"].items()}
        count = Counter("killed" if s in ("killed", "timeout") else s for s in statuses.values())
        if not statuses:
            continue
        total.update(count)
        tested = count["killed"] + count["survived"]
        score = 100 * count["killed"] / tested if tested else 0.0
        rows.append(f"| `{module}` | {len(statuses)} | {count['killed']} | {count['survived']} | "
                    f"{count['no tests'] + count['not checked'] + count['skipped']} | {score:.1f}% |")
        survivors += [k for k, s in statuses.items() if s == "survived"]
    tested = total["killed"] + total["survived"]
    print("| module | mutants | killed | survived | not run | score |\n| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"| all | {sum(total.values())} | {total['killed']} | {total['survived']} | "
          f"{total['no tests'] + total['not checked'] + total['skipped']} | "
          f"{100 * total['killed'] / max(tested, 1):.1f}% |")
    print("\nsurvivors:" if survivors else "\nno survivors")
    for name in survivors:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
