"""The docs never drift from the benchmark results: every result file under bench_results/ is
rendered by docs/gen_bench.py (the Benchmarks page's tables), and no hand-written page (README
included) types a figure those tables hold. `mkdocs build --strict` in .ci/run checks the rest
(links, nav, the generated reference pages)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_bench", ROOT / "docs" / "gen_bench.py")
gen_bench = sys.modules["gen_bench"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_bench)

SECTIONS = gen_bench.sections()
HAND_WRITTEN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_result_file_is_rendered() -> None:
    rendered = {p for s in SECTIONS.values() for p in s.sources}
    missing = sorted(str(p.relative_to(ROOT)) for p in gen_bench.result_files() - rendered)
    assert not missing, f"add a renderer to docs/gen_bench.py SECTIONS for: {missing}"
    assert all(s.markdown.strip() for s in SECTIONS.values())


def test_benchmarks_page_places_every_section() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    placed = re.findall(r"^<!-- bench:(\w+) -->$", page, re.MULTILINE)
    assert sorted(placed) == sorted(SECTIONS), "one <!-- bench:NAME --> line per section"


def test_no_page_types_a_benchmark_figure() -> None:
    measured = set().union(*(gen_bench.figures(s.markdown) for s in SECTIONS.values()))
    sample = "| target | 1.87× faster, 38% of 240.2 inputs/s |"
    assert gen_bench.figures(sample) >= {"1.87×", "38%", "240.2"}  # the extractor finds figures
    assert len(measured) > 50  # and finds them in the generated tables
    typed = {
        str(path.relative_to(ROOT)): sorted(gen_bench.figures(path.read_text()) & measured)
        for path in HAND_WRITTEN
    }
    typed = {page: figs for page, figs in typed.items() if figs}
    assert not typed, f"link to docs/benchmarks.md instead of quoting its figures: {typed}"
