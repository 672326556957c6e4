"""The ingest API's OpenAPI document (docs/ingest.openapi.yaml): it validates, it documents
exactly the routes build_router registers (so a new route fails here until it is
documented), and a real node serves it at GET /openapi.json."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import orjson
from openapi_spec_validator import validate

from pmq.reactor import openapi
from pmq.reactor.ingest import build_router
from tests.helpers import Ingest, Node

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def served() -> dict[tuple[str, str], bool]:
    """(METHOD, path pattern) -> public, for every route of the ingest port."""
    router = build_router(None)  # type: ignore[arg-type]  # routes only keep the app
    return {(method, pattern): public for method, pattern, public in router.routes()}


def documented(document: dict[str, Any]) -> dict[tuple[str, str], bool]:
    """(METHOD, path) -> public (the operation's security is empty), for every operation."""
    return {
        (method.upper(), path): operation.get("security", document.get("security")) == []
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def test_document_is_valid_openapi_3_1() -> None:
    document = openapi.load()
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_document_matches_every_route_of_the_ingest_port() -> None:
    routes, doc = served(), documented(openapi.load())
    assert sorted(set(routes) - set(doc)) == [], "served but not in docs/ingest.openapi.yaml"
    assert sorted(set(doc) - set(routes)) == [], "documented but not served"
    assert routes == doc, "a route's API key requirement differs from its documented security"


def test_node_serves_the_document(make_node: Callable[..., Node]) -> None:
    key = secrets.token_hex(16)
    node = make_node(ingest={"api_key": key}).start()
    site = Ingest(node)  # no key: the document is public, like /healthz
    try:
        status, body = site.call("GET", "/openapi.json")
    finally:
        site.close()
    assert status == 200
    assert body == orjson.loads(orjson.dumps(openapi.load()))
