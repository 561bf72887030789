"""Issue 26: a measurement the code or the docs cite must exist. kd/__init__.py cited
bench/results/omp_wait_policy-*.json for its OpenMP numbers; no such file was ever recorded."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["README.md", "docs/**/*.md", "kd/**/*.py", "flows/**/*.py", "tasks/**/*.py", "backends/**/*.py",
           "bench/*.py", "configs/**/*.yaml"]
CITED = re.compile(r"bench/results/[A-Za-z0-9_.*<>{}\-]+")


def cited_results() -> dict[str, set[str]]:
    """{cited path or glob: files citing it}; templates for future runs (`<date>`, `DATE`, `{a,b}`) left out."""
    out: dict[str, set[str]] = {}
    for pattern in SOURCES:
        for f in REPO.glob(pattern):
            for m in CITED.findall(f.read_text(encoding="utf-8", errors="replace")):
                m = m.rstrip(".")
                if m.endswith(".json") and not re.search(r"[<>{}]|DATE", m):
                    out.setdefault(m, set()).add(str(f.relative_to(REPO)))
    return out


def test_every_cited_bench_result_exists():
    cited = cited_results()
    assert "bench/results/busy_cpu_step-2026-12-02.json" in cited  # the scan finds real citations
    missing = {path: sorted(where) for path, where in cited.items() if not list(REPO.glob(path))}
    assert missing == {}
