"""The docs site in a real browser, offline: headless Chromium (the OS package) driven by
Playwright opens every page of a fresh `mkdocs build` served on 127.0.0.1, with every request
that leaves 127.0.0.1 blocked, and checks what a reader sees: each mermaid diagram drawn as an
SVG, no console error or failed request, search answering, no placeholder such as <key> lost as
an unknown HTML tag, table cells whose config keys never break mid-word inside a table that
scrolls, footer navigation and the repository link.

Needs `chromium` (Debian: `apt-get install chromium`) and the `playwright` package (dev extra);
without them it skips and says which is missing. `POLYTASK_DOCS_SCREENSHOTS=DIR` keeps a
screenshot of every page there.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Material asks GitHub's API for the repository's stars and forks beside the repository link;
# offline that one request fails and the link stays a plain link.
REPO_FACTS = "https://api.github.com/"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright not installed: pip install playwright"),
]

# Closed shadow roots (Material draws each diagram in one) opened so the test can look inside.
OPEN_SHADOW_ROOTS = """
const attach = Element.prototype.attachShadow;
Element.prototype.attachShadow = function (init) { return attach.call(this, {...init, mode: "open"}); };
"""

PAGE_FACTS = """() => {
  const diagrams = [...document.querySelectorAll("div.mermaid")];
  const unknown = [...document.querySelectorAll("article *")]
    .filter(e => e instanceof HTMLUnknownElement).map(e => e.tagName.toLowerCase());
  const cells = [...document.querySelectorAll("article table td code")];
  const broken = cells.filter(c => c.getClientRects().length > 1).map(c => c.textContent);
  const wrappers = [...document.querySelectorAll(".md-typeset__table")];
  return {
    sources: document.querySelectorAll("pre.mermaid").length,
    diagrams: diagrams.length,
    drawn: diagrams.filter(d => d.shadowRoot && d.shadowRoot.querySelector("svg")
                              && !d.shadowRoot.textContent.includes("Syntax error")).length,
    unknown: unknown,
    broken: broken,
    cutTables: wrappers.filter(w => w.scrollWidth > w.clientWidth + 1
                                    && getComputedStyle(w).overflowX !== "auto").length,
    next: !!document.querySelector(".md-footer__link--next"),
    repo: document.querySelector(".md-header__source a, .md-source")?.getAttribute("href") || null,
  };
}"""


def _pages(site: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(site)).replace(".", "") + "/"
                  for p in site.rglob("index.html") if "assets" not in p.parts)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A fresh strict build, served on 127.0.0.1 by a thread of this process."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert build.returncode == 0, build.stderr[-3000:]

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(out)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


class Visit:
    """One page opened offline, with what went wrong while it loaded."""

    def __init__(self, browser: Any, base: str) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.add_init_script(OPEN_SHADOW_ROOTS)
        self.external: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._offline)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", self._failed)

    def _offline(self, route: Any) -> None:
        if route.request.url.startswith(self.base):
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort("internetdisconnected")

    def _console(self, message: Any) -> None:
        if message.type == "error" and not message.location.get("url", "").startswith(REPO_FACTS):
            self.errors.append(f"console: {message.text} ({message.location.get('url')})")

    def _failed(self, request: Any) -> None:
        if not request.url.startswith(REPO_FACTS):
            self.errors.append(f"request failed: {request.url}")

    def open(self, path: str) -> dict[str, Any]:
        self.page.goto(self.base + path, wait_until="networkidle")
        sources = self.page.evaluate("document.querySelectorAll('pre.mermaid, div.mermaid').length")
        if sources:  # Material draws diagrams after load; wait until none is left undrawn
            self.page.wait_for_function(
                "[...document.querySelectorAll('div.mermaid')].every(d => d.shadowRoot) "
                "&& !document.querySelector('pre.mermaid')", timeout=20_000)
        return self.page.evaluate(PAGE_FACTS)

    def close(self) -> None:
        self.context.close()


def test_every_page_reads_right_offline(site: tuple[Path, str], browser: Any) -> None:
    out, base = site
    shots = os.environ.get("POLYTASK_DOCS_SCREENSHOTS")
    repo_url = yaml.safe_load((ROOT / "mkdocs.yml").read_text().split("\nhooks:")[0])["repo_url"]
    pages = _pages(out)
    assert "/" in pages and len(pages) > 10, pages
    visit = Visit(browser, base)
    problems: dict[str, list[str]] = {}
    diagrams = 0
    try:
        for path in pages:
            facts = visit.open(path.lstrip("/"))
            found = []
            if facts["drawn"] != facts["diagrams"] or facts["sources"]:
                found.append(f"{facts['diagrams'] - facts['drawn'] + facts['sources']} diagram(s) not drawn")
            diagrams += facts["drawn"]
            found += [f"<{tag}> lost as an unknown HTML tag" for tag in facts["unknown"]]
            found += [f"`{text}` breaks across lines" for text in facts["broken"]]
            if facts["cutTables"]:
                found.append(f"{facts['cutTables']} table(s) cut off")
            if facts["repo"] != repo_url:
                found.append(f"repository link {facts['repo']!r}, not {repo_url!r}")
            found += visit.errors
            visit.errors.clear()
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                name = path.strip("/").replace("/", "_") or "index"
                visit.page.screenshot(path=str(Path(shots) / f"{name}.png"), full_page=False)
            if found:
                problems[path] = found
        outside = sorted({u for u in visit.external if not u.startswith(REPO_FACTS)})
    finally:
        visit.close()
    assert not problems, problems
    written = sum(p.read_text().count("```mermaid") for p in (ROOT / "docs").rglob("*.md"))
    assert diagrams == written >= 1, f"{diagrams} diagram(s) drawn of the {written} the pages hold"
    assert not outside, f"the site fetches from outside 127.0.0.1: {outside}"


def test_footer_navigation_and_search_work_offline(site: tuple[Path, str], browser: Any) -> None:
    _, base = site
    visit = Visit(browser, base)
    try:
        facts = visit.open("")
        assert facts["next"], "the home page has a footer link to the next page"
        visit.page.click(".md-footer__link--next")
        visit.page.wait_for_load_state("networkidle")
        assert visit.page.url != base, "the footer link leads on"
        visit.open("")
        visit.page.click(".md-search__input")
        visit.page.keyboard.type("autoscaling")  # key by key, as the search box listens
        visit.page.wait_for_selector(".md-search-result__item", timeout=20_000)
        titles = visit.page.locator(".md-search-result__item").all_inner_texts()
        assert any("utoscal" in t for t in titles), titles
        assert not visit.errors, visit.errors
    finally:
        visit.close()
