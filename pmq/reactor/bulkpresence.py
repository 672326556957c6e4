"""``POST /api/v1/presence``: which of up to 1,000 users are online, cluster-wide, and with
how many connections (docs/ingest.md), read from the connection registry in one round trip.
"""

from __future__ import annotations

from pmq.reactor.http import HttpError, HttpRequest, HttpResponse, Router, json_response
from pmq.reactor.ingestbase import IngestApp, add_api_routes, check_uid, json_object, redis_call

MAX_UIDS = 1000
PATH = "/api/v1/presence"


def uids_field(body: dict[str, object]) -> list[str]:
    """The request's ``uids``: a list of at most MAX_UIDS uids (repeats read once); 400
    naming the field otherwise."""
    uids = body.get("uids")
    if not isinstance(uids, list) or len(uids) > MAX_UIDS:
        raise HttpError(400, f"uids: a list of at most {MAX_UIDS} user ids")
    return list(dict.fromkeys(check_uid(uid, "uids") for uid in uids))


def add_presence_route(router: Router, app: IngestApp) -> None:
    """Add ``POST /api/v1/presence`` to the ingest ``router``, behind the API key, timed."""

    async def presence(request: HttpRequest) -> HttpResponse:
        uids = uids_field(json_object(request))
        online = await redis_call(app.routes.online(uids)) if uids else {}
        return json_response(200, {"online": online})

    add_api_routes(router, [("POST", PATH, presence)])
