"""The ingest API's own description, served as JSON at ``GET /openapi.json`` (public).

The document is OpenAPI 3.1 in YAML, shipped inside the package beside this module
(``pmq/reactor/ingest.openapi.yaml``, package data) so that any install serves it;
``docs/ingest.openapi.yaml`` is a symlink to that one file. It is read and encoded once, when
the module is imported. tests/test_openapi.py validates it and checks that its paths and
methods are exactly the routes of pmq.reactor.ingest.build_router.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
import yaml

from pmq.reactor.http import HttpRequest, HttpResponse

FILE = "ingest.openapi.yaml"


def load() -> dict[str, Any]:
    """The document as parsed from the package's YAML file."""
    text = resources.files(__package__).joinpath(FILE).read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, when built with it
    document: dict[str, Any] = yaml.load(text, Loader=loader)
    return document


BODY = orjson.dumps(load())


async def serve(request: HttpRequest) -> HttpResponse:
    """GET /openapi.json: the document as JSON."""
    return HttpResponse(200, BODY)
