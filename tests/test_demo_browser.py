"""End-to-end in a real browser: the notification-centre demo page (``/demo/inbox.html``,
docs/notification-centre.md) on a running node, in headless Chromium, while the site
publishes, retracts and edits through the ingest API. A screenshot lands in docs/img/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import Ingest, Node, user_state, wait_for
from tests.test_chat_browser import (  # noqa: F401 - browser: a fixture
    SCREENSHOTS,
    USER,
    Page,
    browser,
)

pytestmark = pytest.mark.e2e

# The site's publishes, oldest first: (kind, from, body); a broadcast has kind "broadcast".
PUBLISHED = [
    ("letter", 3, {"title": "Welcome to Riverside", "text": "Glad to have you here. Say hello!"}),
    ("notice", None, {"title": "Your article was featured",
                      "text": "“Ten walks along the river” is on the front page today."}),
    ("comment", 7, {"text": "Lovely photos! Which camera did you use?"}),
    ("comment", 8, {"text": "The third walk is my favourite too."}),
    ("broadcast", None, {"title": "Maintenance tonight",
                         "text": "The site is read-only from 02:00 to 02:30 UTC."}),
    ("notice", None, {"title": "100 likes", "text": "Your post “Autumn light” reached 100 likes."}),
    ("comment", 9, {"text": "Is the path along the east bank open again?"}),
    ("letter", 12, {"title": "Meetup on Saturday", "text": "Hi! Are you coming to the walk?"}),
    ("comment", 7, {"text": "Thanks for the tip about the ferry."}),
    ("notice", None, {"title": "New follower", "text": "Mira Chen started following you."}),
    ("comment", 15, {"text": "Great write-up, bookmarked."}),
    ("notice", None, {"title": "Weekly digest", "text": "Your posts were read 1,284 times."}),
]
READ_BEFORE = (2, 4, 5)  # indexes of PUBLISHED the user read elsewhere before opening the page
PAGE = 10  # the page's page size
KINDS = ("comment", "notice", "letter", "system")  # the page's tabs besides "all"


def publish(site: Ingest, kind: str, sender: int | None, body: dict[str, Any]) -> str:
    if kind == "broadcast":
        status, reply = site.call("POST", "/api/v1/broadcast", {"group": "all", "body": body})
        assert status == 202, reply
        return str(reply["data"]["id"])
    message: dict[str, Any] = {"to": USER, "kind": kind, "body": body}
    if sender is not None:
        message["from"] = sender
    status, reply = site.publish(message)
    assert status == 202, reply
    return str(reply["data"]["ids"][0])


def shown(page: Page) -> list[dict[str, Any]]:
    """The items of the page's list, top to bottom."""
    return list(page.page.evaluate(
        """() => Array.from(document.querySelectorAll("#feed .item"), (el) => ({
            id: el.dataset.id, kind: el.dataset.kind, unread: el.classList.contains("unread"),
            text: el.querySelector(".content").textContent,
            background: getComputedStyle(el).backgroundColor }))"""
    ))


def badges(page: Page) -> dict[str, int]:
    return dict(page.page.evaluate(
        """() => Object.fromEntries(Array.from(document.querySelectorAll("#tabs .tab"),
            (tab) => [tab.dataset.kind, Number(tab.querySelector(".badge").textContent || 0)]))"""
    ))


def counters(node: Node) -> dict[str, int]:
    """The user's badge counters as the site reads them, named as the page's tabs."""
    unread = user_state(node, USER)["unread"]
    return {"all": unread["total"], **{k: unread[k] for k in KINDS}}


def read_marks(site: Ingest, query: str = "") -> dict[str, bool]:
    """id -> read, of the user's whole feed (within one page of 100) as the site reads it."""
    status, reply = site.call("GET", f"/api/v1/users/{USER}/messages?limit=100{query}")
    assert status == 200, reply
    return {m["id"]: m["read"] for m in reply["data"]["messages"]}


def test_inbox_page_lists_reads_and_follows_the_site(
    make_node: Callable[..., Node], browser: Any  # noqa: F811
) -> None:
    node = make_node().start()
    site = Ingest(node)
    ids = [publish(site, *entry) for entry in PUBLISHED]
    kinds = ["system" if kind == "broadcast" else kind for kind, _, _ in PUBLISHED]
    status, reply = site.call(
        "POST", f"/api/v1/users/{USER}/read", {"ids": [ids[i] for i in READ_BEFORE]}
    )
    assert status == 200 and reply["data"]["read"] == len(READ_BEFORE), reply

    page = Page(browser, f"http://127.0.0.1:{node.port}/demo/inbox.html?token={node.token(USER)}")
    page.page.set_viewport_size({"width": 1000, "height": 960})
    # The newest page, newest first, with the kinds and read marks of the feed.
    wait_for(lambda: len(shown(page)) == PAGE, 10, "the first page")
    newest = list(range(len(ids) - 1, len(ids) - 1 - PAGE, -1))
    items = shown(page)
    assert [i["id"] for i in items] == [ids[n] for n in newest]
    assert [i["kind"] for i in items] == [kinds[n] for n in newest]
    assert [i["unread"] for i in items] == [n not in READ_BEFORE for n in newest]
    assert PUBLISHED[-1][2]["title"] in items[0]["text"]
    unread_look = {i["background"] for i in items if i["unread"]}
    read_look = {i["background"] for i in items if not i["unread"]}
    assert len(unread_look) == len(read_look) == 1 and unread_look != read_look

    # Badges: the user's counters, live.
    wait_for(lambda: badges(page) == counters(node), 10, "the badges")
    assert badges(page) == {"all": 12, "comment": 5, "notice": 4, "letter": 2, "system": 1}

    # A click reads the item, for the site too.
    target = ids[-2]
    assert read_marks(site)[target] is False
    page.page.click(f'#feed .item[data-id="{target}"]')
    page.page.locator(f'#feed .item[data-id="{target}"]:not(.unread)').wait_for()
    wait_for(lambda: read_marks(site)[target] is True, 10, "the click's read mark")

    # A new message comes in at the top, unread, and its badge goes up.
    live = publish(site, "comment", 21, {"text": "Just joined, love the river series!"})
    wait_for(lambda: shown(page)[0]["id"] == live, 10, "the push at the top")
    assert shown(page)[0]["unread"] and shown(page)[0]["kind"] == "comment"
    assert len(shown(page)) == PAGE + 1
    wait_for(lambda: badges(page)["comment"] == 6 and badges(page)["all"] == 13, 10, "badges")
    page.page.mouse.move(0, 0)  # no item under the pointer (hovered) in the picture
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.page.screenshot(path=str(SCREENSHOTS / "inbox-demo.png"))

    # "More": the older page below, then no more.
    page.page.click("#more")
    wait_for(lambda: len(shown(page)) == len(ids) + 1, 10, "the second page")
    assert [i["id"] for i in shown(page)] == [live, *reversed(ids)]
    page.page.locator("#more").wait_for(state="hidden")

    # The site edits a notice: its new text shows; it retracts a comment and the broadcast:
    # they go, and the comment's badge goes down with it.
    edited = ids[-3]  # "New follower"
    status, reply = site.call(
        "PATCH", f"/api/v1/messages/{edited}",
        {"body": {"title": "New followers", "text": "Mira Chen and 2 others followed you."}},
    )
    assert status == 200, reply
    page.page.locator(f'#feed .item[data-id="{edited}"]', has_text="and 2 others").wait_for()
    assert [i["id"] for i in shown(page)][3] == edited  # in its place
    status, reply = site.call("DELETE", f"/api/v1/messages/{ids[-4]}")
    assert status == 200, reply
    status, reply = site.call("DELETE", f"/api/v1/broadcast/{ids[4]}")
    assert status == 200, reply
    gone = {ids[-4], ids[4]}
    wait_for(lambda: not gone & {i["id"] for i in shown(page)}, 10, "the retracted items gone")
    assert len(shown(page)) == len(ids) - 1
    wait_for(lambda: badges(page)["comment"] == 5 and badges(page)["system"] == 0, 10, "badges")

    # The kind filter: only notices, newest first; "Mark all read" reads them (not the rest)
    # and clears their badge.
    page.page.click('#tabs .tab[data-kind="notice"]')
    notices = [ids[n] for n in reversed(range(len(ids))) if kinds[n] == "notice"]
    wait_for(lambda: [i["id"] for i in shown(page)] == notices, 10, "the notices only")
    assert any(i["unread"] for i in shown(page))
    page.page.click("#read-all")
    wait_for(lambda: not any(i["unread"] for i in shown(page)), 10, "the notices read")
    assert set(read_marks(site, "&kind=notice").values()) == {True}
    assert read_marks(site)[live] is False
    wait_for(lambda: badges(page)["notice"] == 0 and badges(page)["comment"] == 5, 10, "badges")
    page.page.click('#tabs .tab[data-kind="letter"]')
    wait_for(lambda: {i["kind"] for i in shown(page)} == {"letter"}, 10, "the letters only")
    assert len(shown(page)) == 2
    site.close()
    page.close()
