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


def test_every_section_is_placed_once() -> None:
    """Each benchmark's tables stand on one page (the Benchmarks page, or the tutorial for its
    own run), on a `<!-- bench:NAME -->` line."""
    placed = [name for path in HAND_WRITTEN
              for name in re.findall(r"^<!-- bench:(\w+) -->$", path.read_text(), re.MULTILINE)]
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


# --- numbers that live in the code --------------------------------------------------------------

_spec = importlib.util.spec_from_file_location("values", ROOT / "docs" / "values.py")
values = sys.modules["values"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(values)

NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.])")
TOO_COMMON = {0.0, 1.0}  # 0 and 1 read as "off", "one", "greedy": not a claim about a setting


def settings_in_code() -> dict[str, set[float]]:
    """key → the numbers the code and the shipped Serve configs give it: every numeric default
    of the experiment file and the Serve args, every number in serve_configs/, and the serve
    deployment defaults set in code (polytask.serve.app)."""
    import yaml
    from pydantic import BaseModel

    from polytask.config import ExperimentConfig
    from polytask.serve import app
    from polytask.serve.args import ServeArgs

    found: dict[str, set[float]] = {}

    def add(key: str, value: object) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found.setdefault(key, set()).add(float(value))

    def walk_model(model: type[BaseModel]) -> None:
        for name, info in model.model_fields.items():
            if not info.is_required():
                add(name, info.get_default(call_default_factory=True))
            for tp in values._flatten(info.annotation):
                if isinstance(tp, type) and issubclass(tp, BaseModel):
                    walk_model(tp)

    def walk(node: object) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, value in items:
            add(str(key), value)
            walk(value)

    walk_model(ExperimentConfig)
    walk_model(ServeArgs)
    for name in ("local", "cluster"):
        walk(yaml.safe_load((ROOT / "serve_configs" / f"{name}.yaml").read_text()))
    walk(app.HEALTH_CHECK)
    for value in app.MAX_ONGOING.values():
        add("max_ongoing_requests", value)
    return {k: v - TOO_COMMON for k, v in found.items() if v - TOO_COMMON}


def _prose(markdown: str) -> list[tuple[int, str]]:
    """(line, sentence) of the prose: code blocks left out (the example tests check those),
    paragraphs joined and cut into sentences, each table row on its own."""
    out, inside, paragraph = [], False, []

    def flush() -> None:
        if paragraph:
            start, text = paragraph[0][0], " ".join(line for _, line in paragraph)
            out.extend((start, s) for s in re.split(r"(?<=[.;])\s+", text))
            paragraph.clear()

    for lineno, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            flush()
            inside = not inside
        elif inside:
            continue
        elif not line.strip() or line.lstrip().startswith(("|", "#")):
            flush()
            out.append((lineno, line))
        else:
            paragraph.append((lineno, line))
    flush()
    return out


def typed_settings(markdown: str, known: dict[str, set[float]]) -> list[str]:
    """Sentences that name a setting and type a number the code gives it: outside code spans any
    such number, inside a code span only `key: N` in a sentence that calls it a default.
    `{{ NAME }}` values are generated, not typed."""
    found = []
    for lineno, sentence in _prose(markdown):
        sentence = values.PLACEHOLDER.sub("", sentence)
        keys = {k.rsplit(".", 1)[-1] for k in re.findall(r"`([a-z_][a-z0-9_.]*)", sentence)}
        prose = re.sub(r"`[^`]*`", "", sentence)
        typed = {float(n) for n in NUMBER.findall(prose)}
        for key in sorted(keys & set(known)):
            hits = known[key] & typed
            if "default" in sentence:
                spans = re.findall(rf"`{key}: (\d+(?:\.\d+)?)`", sentence)
                hits |= {float(n) for n in spans} & known[key]
            if hits:
                found.append(f"line {lineno}: `{key}` {sorted(hits)}: {sentence.strip()[:120]}")
    return found


def test_no_page_types_a_setting_from_the_code() -> None:
    known = settings_in_code()
    sample = "| `max_batch_size` | 32 | inputs per pass; the default `ingress_batches_in_flight: 2` |"
    assert len(typed_settings(sample, known)) == 2  # the check finds typed values
    typed = {str(p.relative_to(ROOT)): typed_settings(p.read_text(), known) for p in HAND_WRITTEN}
    typed = {page: lines for page, lines in typed.items() if lines}
    assert not typed, (
        "write {{ serve.KEY }}, {{ config.SECTION.KEY }}, {{ local.PATH }}, ... (docs/values.py) "
        f"instead of the number: {typed}"
    )


def test_every_value_placeholder_resolves() -> None:
    used = {m for p in HAND_WRITTEN for m in values.PLACEHOLDER.findall(p.read_text())}
    assert used, "no page uses {{ NAME }}"
    unknown = {}
    for name in sorted(used):
        try:
            values.text(name)
        except values.UnknownValue as exc:
            unknown[name] = str(exc)
    assert not unknown, unknown
    with __import__("pytest").raises(values.UnknownValue):
        values.text("serve.no_such_setting")


def _source_text() -> str:
    """polytask's source with adjacent string literals joined ("a " f"b" → "a b"), so a message
    split over source lines reads whole."""
    code = "\n".join(p.read_text() for p in sorted((ROOT / "platform" / "polytask").rglob("*.py")))
    return re.sub(r"([\"'])\s*\n\s*[rbfu]*([\"'])", "", code)


def message_fragments(page: str) -> list[str]:
    """The literal pieces of every message a page quotes in a ```text block: cut at each `…`
    (a name or number of the reader's case) and at each `; ` (messages are composed of clauses).
    A block right after a ```yaml block is left to tests/test_docs_examples.py, which checks it
    whole against the error the YAML gives."""
    fences = re.findall(r"^```(\w+)\n(.*?)^```", page, re.DOTALL | re.MULTILINE)
    blocks = [body for i, (lang, body) in enumerate(fences)
              if lang == "text" and not (i and fences[i - 1][0] == "yaml")]
    pieces = [p.strip(" -\n'\"[]") for b in blocks for line in b.splitlines()
              for part in line.split("…") for p in part.split("; ")]
    return [p for p in pieces if len(p) >= 12]


def test_troubleshooting_quotes_the_code() -> None:
    code = _source_text()
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    fragments = message_fragments(page)
    assert len(fragments) > 20
    assert "is not in the label set" in code and "this is not a polytask message" not in code
    missing = [f for f in fragments if f not in code and f.replace("error: ", "") not in code]
    assert not missing, f"no longer what the code says (take the text from the code): {missing}"


def test_every_configuration_key_is_described() -> None:
    """The configuration reference has a description for every key (pydantic Field
    descriptions, written at the source)."""
    from pydantic import BaseModel

    from polytask.config import ExperimentConfig
    from polytask.serve.args import ServeArgs

    bare, todo = [], [ExperimentConfig, ServeArgs]
    while todo:
        model = todo.pop()
        for name, info in model.model_fields.items():
            if not (info.description or "").strip():
                bare.append(f"{model.__name__}.{name}")
            todo += [tp for tp in values._flatten(info.annotation)
                     if isinstance(tp, type) and issubclass(tp, BaseModel)]
    assert not bare, f"add Field(description=...) to: {sorted(set(bare))}"
