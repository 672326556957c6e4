"""End-to-end in a real browser: the agent console and the user's chat page (docs/protocol.md,
"Customer-service chat") talk to each other through a running node, in headless Chromium
(Debian's package, driven by playwright; no browser download). Screenshots of both pages
land in docs/img/."""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pmq.domain.jwtauth import mint_token
from pmq.redis.keys import Keys
from tests.helpers import SECRET, Ingest, Node, wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "img"
AGENT, USER = "9001", "42"
TIMEOUT_MS = 10_000

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
)
if shutil.which(CHROMIUM) is None:
    pytest.skip(
        f"{CHROMIUM} is not installed (scripts/services chromium installs it)",
        allow_module_level=True,
    )


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A tiny solid-colour PNG, made here so the test needs no image file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


@contextlib.contextmanager
def image_server() -> Iterator[str]:
    """An http.server on 127.0.0.1 serving /logo.png and /photo.png; yields its base URL."""
    images = {"/logo.png": png(48, 48, (31, 136, 61)), "/photo.png": png(64, 40, (207, 34, 46))}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Page:
    """One page of the node in its own browser context; JavaScript errors fail the test."""

    def __init__(self, browser: Any, url: str) -> None:
        self.context = browser.new_context(viewport={"width": 1000, "height": 640})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on(
            "console",
            lambda m: m.type == "error" and self.errors.append(f"{m.text} ({m.location})"),
        )
        self.page.goto(url)
        self.page.locator("#status", has_text="online").wait_for()

    def send(self, text: str = "", image: str = "") -> None:
        self.page.fill("#text", text)
        self.page.fill("#image-url", image)
        self.page.click("#send")

    def message(self, text: str) -> Any:
        return self.page.locator("#messages .msg", has_text=text)

    def image_loaded(self, url: str) -> None:
        selector = f'#messages .msg img[src="{url}"]'
        self.page.locator(selector).wait_for()
        self.page.wait_for_function(
            "s => { const i = document.querySelector(s); return i && i.naturalWidth > 0; }",
            arg=selector,
        )

    def close(self) -> None:
        assert self.errors == [], self.errors
        self.context.close()


def test_agent_and_user_pages_chat_through_a_node(
    make_node: Callable[..., Node], browser: Any, redis_prefix: str, redis_client: redis.Redis
) -> None:
    node = make_node().start()
    keys = Keys(redis_prefix)
    base = f"http://127.0.0.1:{node.port}/cs"
    agent_url = f"{base}/agent.html?token={mint_token(SECRET, AGENT, (), 'agent', 3600)}"
    user_url = f"{base}/chat.html?token={mint_token(SECRET, USER, (), 'user', 3600)}"

    def inbox_empty(uid: str) -> bool:
        return redis_client.zcard(keys.inbox(uid)) == 0

    with image_server() as images:
        agent = Page(browser, agent_url)
        user = Page(browser, user_url)
        user.page.click("#start")
        user.page.locator("#title", has_text=f"Chatting with agent {AGENT}").wait_for()
        agent.page.locator(".session.selected", has_text=f"User {USER}").wait_for()

        user.send("Hello, my order has not arrived")
        agent.message("Hello, my order has not arrived").wait_for()
        agent.send("Sorry about that! Could you send a photo of the label?")
        user.message("Could you send a photo of the label?").wait_for()
        user.send(image=f"{images}/photo.png")
        agent.image_loaded(f"{images}/photo.png")
        user.image_loaded(f"{images}/photo.png")
        agent.send(image=f"{images}/logo.png")
        user.image_loaded(f"{images}/logo.png")
        agent.image_loaded(f"{images}/logo.png")
        # Both pages ack what they displayed: nothing waits in either inbox.
        wait_for(lambda: inbox_empty(AGENT) and inbox_empty(USER), 10, "displayed messages acked")

        # The agent drops off; what the user sends meanwhile shows when the console is back.
        agent.close()
        user.send("Are you still there?")
        wait_for(lambda: not inbox_empty(AGENT), 10, "the message in the agent's inbox")
        agent = Page(browser, agent_url)
        agent.message("Are you still there?").wait_for()
        agent.message("Hello, my order has not arrived").wait_for()  # history of the session
        agent.image_loaded(f"{images}/photo.png")
        wait_for(lambda: inbox_empty(AGENT), 10, "the replayed message acked")
        agent.send("Yes! A new parcel is on its way.")
        user.message("A new parcel is on its way.").wait_for()

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        agent.page.screenshot(path=str(SCREENSHOTS / "cs-agent.png"))
        user.page.screenshot(path=str(SCREENSHOTS / "cs-chat.png"))

        user.page.click("#close")
        user.page.locator("#title", has_text="Chat ended").wait_for()
        agent.page.locator(".session.closed", has_text=f"User {USER}").wait_for()
        agent.close()
        user.close()


def test_client_module_in_a_page_reconnects_after_a_kill(
    make_node: Callable[..., Node], browser: Any, redis_prefix: str, redis_client: redis.Redis
) -> None:
    """The client module as a page of the node imports it (/cs/pmq-client.js): it connects,
    gets a push, and after a kill -9 of the socket worker holding it, reconnects and gets
    the next one, once each."""
    node = make_node().start()
    uid = "77"
    page = Page(browser, f"http://127.0.0.1:{node.port}/cs/chat.html?token={node.token(USER)}")
    page.page.evaluate(
        """async (token) => {
            const { PmqClient } = await import("/cs/pmq-client.js");
            window.texts = [];
            window.hellos = 0;
            const client = new PmqClient({ token });
            client.on("message", (msg) => window.texts.push(msg.body.text));
            client.on("connected", () => (window.hellos += 1));
            await client.connect();
        }""",
        node.token(uid),
    )

    def publish(text: str) -> None:
        site = Ingest(node)  # a connection of its own: the ingest port is the workers' too
        status, reply = site.publish({"to": uid, "kind": "notice", "body": {"text": text}})
        site.close()
        assert status == 202, reply

    def texts() -> list[str]:
        return list(page.page.evaluate("window.texts"))

    publish("before")
    wait_for(lambda: texts() == ["before"], 10, "the push in the page")
    [holder] = redis_client.hvals(Keys(redis_prefix).user_conns(uid))  # node:socketN:pid
    os.kill(int(str(holder).rpartition(":")[2]), signal.SIGKILL)
    wait_for(lambda: page.page.evaluate("window.hellos") == 2, 20, "the page's client back")
    publish("after")
    wait_for(lambda: texts() == ["before", "after"], 10, "the push after the reconnect")
    page.close()
