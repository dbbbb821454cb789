"""
The per-module table of a mutmut run (docs/testing.rst, "Mutation testing").

Reads the results mutmut keeps beside each mutated module (mutants/**/*.py.meta) and prints, for each
module, the mutants checked and how they ended: killed (a test failed), survived (every test passed),
timeout, suspicious, no tests (no selected test reaches the function), and the score,
killed / (killed + survived).  Mutants not checked (e.g. the relay client outside its dot-stuffing) are
left out.  Run from the repository directory after `mutmut run`:

    .venv/bin/python bench/mutation_scores.py [--rst]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

COLUMNS = ("killed", "survived", "timeout", "suspicious", "no tests")


def status(exit_code: int | None) -> str | None:
    """mutmut's verdict for a worker's exit code (mutmut.stats.status_by_exit_code), None if not checked."""
    if exit_code is None:
        return None
    return {
        1: "killed",
        3: "killed",
        37: "killed",  # caught by the type check
        0: "survived",
        5: "no tests",
        33: "no tests",
        34: "skipped",
        36: "timeout",
        -24: "timeout",
        24: "timeout",
        152: "timeout",
        255: "timeout",
    }.get(exit_code, "suspicious")


def table(root: Path = Path("mutants")) -> list[tuple[str, Counter[str]]]:
    rows = []
    for meta in sorted(root.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        counts = Counter(s for s in map(status, codes) if s is not None)
        if counts:
            rows.append((str(meta.relative_to(root))[: -len(".meta")], counts))
    return rows


def score(counts: Counter[str]) -> str:
    tried = counts["killed"] + counts["survived"]
    return f"{100 * counts['killed'] / tried:.0f} %" if tried else "-"


def main(argv: list[str]) -> int:
    rows = table()
    if not rows:
        print("no mutmut results under mutants/: run `mutmut run` first", file=sys.stderr)
        return 1
    total: Counter[str] = Counter()
    for _, counts in rows:
        total.update(counts)
    rows.append(("total", total))
    header = ("module", *COLUMNS, "score")
    lines = [(name, *(str(c[k]) for k in COLUMNS), score(c)) for name, c in rows]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    if "--rst" in argv:
        rule = " ".join("=" * w for w in widths)
        out = [rule, " ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), rule]
        out += [" ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines]
        out.append(rule)
    else:
        out = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in [header, *lines]]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
