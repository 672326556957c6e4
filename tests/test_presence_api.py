"""POST /api/v1/presence: which of many users are online, cluster-wide (docs/ingest.md)."""

from __future__ import annotations

from collections.abc import Callable

from tests.helpers import Ingest, Node, wait_for, ws_client


def test_presence_lists_only_online_users_with_their_connections_on_every_node(
    make_node: Callable[..., Node],
) -> None:
    first, second = make_node().start(), make_node().start()
    site = Ingest(first)
    try:
        with ws_client(first, 11), ws_client(second, 11), ws_client(second, 12):
            status, reply = site.call("POST", "/api/v1/presence", {"uids": [11, "12", 13, 11]})
            assert status == 200, reply
            assert reply["data"] == {"online": {"11": 2, "12": 1}}
        wait_for(
            lambda: site.call("POST", "/api/v1/presence", {"uids": [11, 12]})[1]["data"]
            == {"online": {}},
            what="both users offline",
        )
        assert site.call("POST", "/api/v1/presence", {"uids": []}) == (
            200, {"code": 200, "msg": "OK", "data": {"online": {}}}
        )
    finally:
        site.close()


def test_presence_refuses_too_many_uids_a_non_list_and_a_bad_uid(
    make_node: Callable[..., Node],
) -> None:
    site = Ingest(make_node().start())
    try:
        for body, message in (
            ({"uids": list(range(1, 1002))}, "uids: a list of at most 1000 user ids"),
            ({"uids": "1,2"}, "uids: a list of at most 1000 user ids"),
            ({}, "uids: a list of at most 1000 user ids"),
            ({"uids": [1, "x"]}, "uids: must be a user id (a positive integer)"),
            ({"uids": [0]}, "uids: must be a user id (a positive integer)"),
        ):
            status, reply = site.call("POST", "/api/v1/presence", body)
            assert (status, reply["msg"]) == (400, message), body
        assert site.call("POST", "/api/v1/presence", {"uids": list(range(1, 1001))})[0] == 200
    finally:
        site.close()
