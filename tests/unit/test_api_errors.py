"""The error catalogue (serve/errors.py) is the code's: every code the serve code raises is in it
with the status it is raised with, every code in it is raised somewhere, and each route of the
app documents exactly the errors of the steps it goes through."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from polytask.serve import errors

SERVE = Path(errors.__file__).parent
RAISED = re.compile(r'APIError\(\s*(\d{3}),\s*"(\w+)"')
TEXT_ERRORS = re.compile(r'TextError\(\s*"(\w+)"')  # answered as 422 (serve.validation._fit)
STREAM_ERRORS = re.compile(r'"code": "(\w+)"')  # an `error` event after the 200 of a stream


def raised_codes() -> dict[str, set[int]]:
    """code → the statuses the serve code raises it with, read from its source."""
    found: dict[str, set[int]] = {}
    for path in sorted(SERVE.glob("*.py")):
        text = path.read_text()
        for status, code in RAISED.findall(text):
            found.setdefault(code, set()).add(int(status))
        for code in TEXT_ERRORS.findall(text):
            found.setdefault(code, set()).add(422)
    return found


def test_the_catalogue_holds_every_raised_code_with_its_status() -> None:
    raised = raised_codes()
    catalogue = errors.all_codes()
    assert {"unknown_task", "timeout", "empty_text"} <= set(raised)  # the scan finds them
    wrong = {c: (s, catalogue[c].status if c in catalogue else None) for c, s in raised.items()
             if c not in catalogue or s != {catalogue[c].status}}
    assert not wrong, f"code: (raised with, catalogue says): {wrong}"
    streamed = {c for p in SERVE.glob("*.py") for c in STREAM_ERRORS.findall(p.read_text())}
    assert streamed <= set(catalogue), streamed - set(catalogue)
    unused = sorted(set(catalogue) - set(raised))
    assert not unused, f"in the catalogue but raised nowhere: {unused}"


class _StandIn:
    """Enough of an Ingress replica for create_api to build its routes; nothing is called."""

    specs: dict[str, Any] = {}  # noqa: RUF012 - read only
    api_key = None
    encoder = None
    metrics = None

    def __init__(self) -> None:
        from polytask.serve.args import ServeArgs

        self.args = ServeArgs(model="stand-in")
        self.settings = SimpleNamespace(**self.args.model_dump())


def test_each_route_documents_the_errors_of_its_steps() -> None:
    from polytask.serve.http import create_api

    spec = create_api(_StandIn()).openapi()
    routes = {(m, p): op for p, ms in spec["paths"].items() for m, op in ms.items()}
    assert set(routes) == set(errors.ROUTE_STEPS), "every route lists its steps in ROUTE_STEPS"
    for (method, path), op in routes.items():
        want = {str(e.status) for e in errors.route_errors(method, path).values()}
        documented = set(op["responses"]) - {"200"}
        assert documented == want, (method, path, sorted(documented), sorted(want))
        for status, response in op["responses"].items():
            if status == "200":
                continue
            codes = set(re.findall(r"`(\w+)`:", response["description"]))
            assert codes == {c for c, e in errors.route_errors(method, path).items()
                             if str(e.status) == status}, (method, path, status)
    assert "unknown_task" not in errors.route_errors("get", "/v1/tasks")
    assert "not_streamable" in errors.route_errors("post", "/v1/tasks/{task}/generate/stream")
