"""One user's connection to PMQ, kept open, and everything it carries (docs/client-python.md).

:class:`Client` connects with a token (or a function returning one, or a coroutine
function, called before every connect), waits for the hello, and from then on:

- hands every message to the application once (:meth:`Client.messages`), however often
  reconnects replay it, remembering the last ``dedupe_size`` ids;
- acks what the application received in batches: one ``msg.ack`` per ``ack_delay`` seconds
  or per ``ack_batch`` ids, whichever comes first, sent again after a reconnect when its
  reply never came;
- keeps the unread counters (:attr:`Client.unread`; read after every hello, as they may
  have moved while the client was away, then kept by each ``unread`` frame) and tells
  listeners (:meth:`Client.on`) of them and of every other event frame (``revoke``,
  ``update``, ``cs.assigned``, ``cs.closed``), of ``connected``, ``disconnected`` and
  ``stopped``;
- reconnects after any loss with capped exponential back-off and full jitter
  (:class:`~pmq.backoff.Backoff`), until a close or a handshake answer after which
  trying again would not help stops it (a kick, 4001; a newer device over the user's
  connection bound, 4008; a refused token, 401 or 403): :attr:`Client.stopped` says why.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pmq.backoff import Backoff
from pmq.client.errors import ClientError, ConnectionLost, RequestError, RequestTimeout, Stopped
from pmq.client.seen import Seen
from pmq.wire.client import CloseCode, Code, FrameType

Token = str | Callable[[], str | Awaitable[str]]
Listener = Callable[[Any], Any]
Data = dict[str, Any]
Ids = list[str]  # a name of its own: Client.list hides the builtin in the class body

log = logging.getLogger("pmq.client")

PULL_PAGE = 200  # messages per msg.pull when the connect's replay stopped at its bound
MAX_ACK = 1000  # ids per msg.ack, the server's bound
# Closes and handshake answers after which reconnecting would not help: the site closed the
# user's connections, or a newer device took this one's place (the user's connection bound);
# the token was refused, or its user may not connect.
FINAL_CLOSES = {CloseCode.KICKED, CloseCode.TOO_MANY_CONNECTIONS}
FINAL_STATUSES = {Code.UNAUTHORIZED, Code.FORBIDDEN}
RECONNECT = Backoff()  # base 0.5 s, cap 10 s


def fields(**values: Any) -> Data:
    """A request's data: the fields given, without those left at None."""
    return {name: value for name, value in values.items() if value is not None}


class Client:
    """One user's PMQ connection: ``await start()`` (or ``async with``), read
    :meth:`messages`, call actions, ``await close()``."""

    def __init__(
        self,
        url: str,
        token: Token,
        *,
        backoff: Backoff = RECONNECT,
        request_timeout: float = 10.0,
        ack_delay: float = 0.05,
        ack_batch: int = 100,
        dedupe_size: int = 10_000,
        auto_ack: bool = True,
        connect_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.token = token
        self.backoff = backoff
        self.request_timeout = request_timeout
        self.ack_delay = ack_delay
        self.ack_batch = max(1, min(ack_batch, MAX_ACK))
        self.auto_ack = auto_ack
        self.connect_timeout = connect_timeout  # TCP, the upgrade and the hello together
        self.unread: dict[str, int] = {}  # the counters of the last unread frame or reply
        self._unread_frames = 0  # unread frames so far (unread_get's reply may be older)
        self.hello: Data | None = None  # the live connection's hello; None while down
        self.stopped: Stopped | None = None  # why the client stopped for good
        self._ready: asyncio.Future[ClientConnection] | None = None  # done while connected
        self._pending: dict[str, asyncio.Future[Data]] = {}  # replies awaited, by request id
        self._ids = itertools.count(1)
        self._seen = Seen(dedupe_size)
        self._inbox: asyncio.Queue[Data | None] = asyncio.Queue()  # None: no more
        self._acks: Ids = []  # ids to ack, not yet sent
        self._acks_waiting = asyncio.Event()
        self._acks_full = asyncio.Event()
        self._listeners: dict[str, list[Listener]] = collections.defaultdict(list)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []

    # Life -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect; return once the first hello came (reconnects then go on by
        themselves). Raises :class:`Stopped` when the client stops first (a refused
        token)."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_future()
            self._loops = [asyncio.create_task(self._run()), asyncio.create_task(self._ack_loop())]
        await self._connection()

    async def close(self) -> None:
        """Send the acks still waiting (when connected), close the connection and stop for
        good; :meth:`messages` ends after what it holds. Idempotent."""
        ws = self._ready.result() if self.connected and self._ready is not None else None
        if ws is not None and self._acks:
            with contextlib.suppress(ClientError):
                for ids in batches(self._take_acks(), self.ack_batch):
                    await self._send_acks(ids)
        self._stop(Stopped(None, "closed by the application"))
        for task in (*self._loops, *self._tasks):
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        if ws is not None:
            await ws.close()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self.hello is not None

    # Messages and events ----------------------------------------------------------------
    async def messages(self) -> AsyncIterator[Data]:
        """Every message (the ``msg`` of a push, as the server sent it) once, in the order
        it came. With ``auto_ack`` its id is acked once it has been handed over. Ends after
        :meth:`close`; raises the :class:`Stopped` when the client stopped by itself (a
        kick, a refused token). Read by one consumer at a time."""
        while True:
            message = await self._inbox.get()
            if message is None:
                self._inbox.put_nowait(None)  # any later reader stops too
                if self.stopped is not None and self.stopped.code is not None:
                    raise self.stopped
                return
            if self.auto_ack:
                self._queue_ack(message["id"])
            yield message

    def on(self, event: str, listener: Listener) -> Callable[[], None]:
        """Call ``listener(value)`` on every ``event``; returns what removes it. A listener
        may be a coroutine function (its coroutine runs as a task); what it raises is
        logged. Events and values: ``connected`` (the hello frame), ``disconnected`` (a
        :class:`ConnectionLost`), ``stopped`` (the :class:`Stopped`), ``unread`` (the
        counters), and each other frame the server sends by its type (``revoke``,
        ``update``, ``cs.assigned``, ``cs.closed``, ...) with the frame."""
        self._listeners[event].append(listener)
        return lambda: self._listeners[event].remove(listener)

    def _emit(self, event: str, value: Any) -> None:
        for listener in tuple(self._listeners.get(event, ())):
            try:
                result = listener(value)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:
                log.exception("pmq.client: a listener of %r failed", event)

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("pmq.client: a task failed", exc_info=task.exception())

    # Requests ---------------------------------------------------------------------------
    async def request(
        self, action: str, data: Data | None = None, timeout: float | None = None
    ) -> Data:
        """Send one request and return its reply's data. Raises :class:`RequestError` for
        a code other than 200, :class:`RequestTimeout` when no reply came within
        ``timeout`` (``request_timeout`` by default; waiting for a connection counts),
        :class:`ConnectionLost` when the connection closed first (the request is not sent
        again) and :class:`Stopped` once the client has stopped."""
        limit = self.request_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                ws = await self._connection()
                request_id = f"c{next(self._ids)}"
                reply: asyncio.Future[Data] = asyncio.get_running_loop().create_future()
                self._pending[request_id] = reply
                try:
                    frame = {"id": request_id, "action": action, "data": data or {}}
                    await ws.send(orjson.dumps(frame).decode())
                    answer = await reply
                except ConnectionClosed:
                    raise lost(ws) from None
                finally:
                    del self._pending[request_id]
        except TimeoutError:
            raise RequestTimeout(f"{action}: no reply within {limit} s") from None
        if answer.get("code") != Code.OK:
            raise RequestError(int(answer.get("code") or 0), str(answer.get("msg")))
        return answer.get("data") or {}

    async def _connection(self) -> ClientConnection:
        """The live connection, once there is one; :class:`Stopped` if there never will."""
        if self._ready is None:
            raise ClientError("start() the client first")
        return await asyncio.shield(self._ready)

    async def ping(self) -> Data:
        return await self.request("ping")

    async def ack(self, ids: Iterable[str]) -> Data:
        """Ack ``ids`` now, in one request (``auto_ack`` does this in batches)."""
        return await self.request("msg.ack", {"ids": [str(i) for i in ids]})

    async def pull(self, after: str | None = None, limit: int | None = None) -> Data:
        """Unacked messages after ``after`` in id order (``{"messages": [...]}``)."""
        return await self.request("msg.pull", fields(after=after, limit=limit))

    async def unread_get(self) -> Data:
        """The unread counters, also kept in :attr:`unread` unless an ``unread`` frame came
        while the reply was on its way (the frame may be the newer: the server can read the
        counters for the reply before a change it pushes first)."""
        frames = self._unread_frames
        counts = await self.request("unread.get")
        if self._unread_frames == frames:
            self._set_unread(counts)
        return counts

    async def unread_clear(self, kinds: Iterable[str] | None = None) -> Data:
        """Set the counters of ``kinds`` (all when None) to 0."""
        return await self.request("unread.clear", fields(kinds=None if kinds is None else [*kinds]))

    async def list(
        self,
        kind: str | None = None,
        before: str | None = None,
        limit: int | None = None,
        unread_only: bool | None = None,
    ) -> Data:
        """The notification centre (``msg.list``): messages newest first with their read
        state, and ``next`` for the page after."""
        return await self.request(
            "msg.list", fields(kind=kind, before=before, limit=limit, unread_only=unread_only)
        )

    async def read(
        self, ids: Iterable[str] | None = None, kinds: Iterable[str] | None = None
    ) -> Data:
        """Mark read (``msg.read``): ``ids``, or every message of ``kinds``, or everything."""
        return await self.request(
            "msg.read",
            fields(ids=None if ids is None else [*ids], kinds=None if kinds is None else [*kinds]),
        )

    async def cs_open(self) -> Data:
        """Open (or find) this user's customer-service session."""
        return await self.request("cs.open")

    async def cs_send(
        self, session_id: str, text: str | None = None, image: Data | None = None
    ) -> Data:
        """Send ``text`` or ``image`` (``{"url", "width"?, "height"?}``) to the session's
        other party; ``{"id"}`` of the message."""
        return await self.request("cs.send", fields(session_id=session_id, text=text, image=image))

    async def cs_close(self, session_id: str) -> Data:
        return await self.request("cs.close", {"session_id": session_id})

    async def cs_history(
        self,
        session_id: str | None = None,
        peer: str | None = None,
        before: str | None = None,
        limit: int | None = None,
    ) -> Data:
        """A session's messages (or all with ``peer``), newest first."""
        return await self.request(
            "cs.history", fields(session_id=session_id, peer=peer, before=before, limit=limit)
        )

    async def cs_sessions(self) -> Data:
        """An agent's open sessions and the queue's length."""
        return await self.request("cs.sessions")

    # The connection ---------------------------------------------------------------------
    async def _run(self) -> None:
        """Connect, read, and connect again after the back-off, until stopped."""
        attempt = 0
        while True:
            try:
                ws = await self._open()
            except InvalidStatus as exc:
                status = exc.response.status_code
                if status in FINAL_STATUSES:
                    answer = (exc.response.body or b"").decode(errors="replace").strip()
                    self._stop(Stopped(status, answer or f"the handshake answered {status}"))
                    return
                log.info("pmq.client: connect answered %s", status)
            except Exception as exc:  # refused, reset, timed out, the token callback's own
                log.info("pmq.client: connect failed: %r", exc)
            else:
                attempt = 0
                await self._read(ws)
                gone = lost(ws)
                self._down(gone)
                if gone.code in FINAL_CLOSES:
                    self._stop(Stopped(gone.code, gone.reason))
                    return
            await asyncio.sleep(self.backoff.delay(attempt))
            attempt += 1

    async def _open(self) -> ClientConnection:
        """A new connection that has said hello (closed again if it fails on the way)."""
        token = self.token if isinstance(self.token, str) else self.token()
        if inspect.isawaitable(token):
            token = await token
        async with asyncio.timeout(self.connect_timeout):
            ws = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                max_size=None,  # a page of msg.pull may hold 200 large bodies
                open_timeout=None,
            )
            try:
                hello = orjson.loads(await ws.recv())
                if hello.get("type") != FrameType.HELLO:
                    raise ValueError(f"the first frame is not a hello: {hello!r:.200}")
            except BaseException:
                await ws.close()
                raise
        self._up(ws, hello)
        return ws

    def _up(self, ws: ClientConnection, hello: Data) -> None:
        assert self._ready is not None
        self.hello = hello
        self._ready.set_result(ws)
        self._emit("connected", hello)
        self._spawn(self._read_unread())

    async def _read_unread(self) -> None:
        """The counters after a hello: they may have moved while the client was away, and a
        connect brings no ``unread`` frame. A failure leaves them to the next frame."""
        with contextlib.suppress(ClientError):
            await self.unread_get()

    def _down(self, gone: ConnectionLost) -> None:
        """The connection is gone: requests waiting for a reply fail, later ones wait for
        the next connection."""
        self.hello = None
        self._ready = asyncio.get_running_loop().create_future()
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(gone)
        self._emit("disconnected", gone)

    def _stop(self, stopped: Stopped) -> None:
        """Stop for good: no more connects, requests fail, :meth:`messages` ends."""
        if self.stopped is not None:
            return
        self.stopped = stopped
        self.hello = None
        if self._ready is None or self._ready.done():
            self._ready = asyncio.get_running_loop().create_future()
        self._ready.set_exception(stopped)  # to whoever waits for a connection, and later
        self._ready.exception()  # retrieved: nobody may be waiting
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(stopped)
        self._inbox.put_nowait(None)
        self._emit("stopped", stopped)

    async def _read(self, ws: ClientConnection) -> None:
        """Dispatch the connection's frames until it closes."""
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                try:
                    frame = orjson.loads(raw)
                    self._dispatch(frame)
                except (ValueError, KeyError, TypeError, AttributeError):
                    log.warning("pmq.client: a frame not understood: %.200r", raw)

    def _dispatch(self, frame: Data) -> None:
        kind = frame["type"]
        if kind == FrameType.REPLY:
            reply = self._pending.get(str(frame.get("id")))
            if reply is not None and not reply.done():
                reply.set_result(frame)
        elif kind == FrameType.PUSH:
            self._deliver(frame["msg"])
        elif kind == FrameType.UNREAD:
            self._unread_frames += 1
            self._set_unread(frame["data"])
        elif kind == FrameType.INBOX_MORE:
            self._spawn(self._pull_rest(str(frame["after"])))
        else:
            self._emit(kind, frame)

    def _deliver(self, message: Data) -> None:
        if self._seen.add(str(message["id"])):
            self._inbox.put_nowait(message)

    def _set_unread(self, counts: Data) -> None:
        if counts != self.unread:
            self.unread.clear()
            self.unread.update(counts)
            self._emit("unread", dict(counts))

    async def _pull_rest(self, after: str) -> None:
        """The messages a connect's replay left out (it stops at its bound and says
        ``inbox.more``), page by page; a failure leaves them to the next connect's replay."""
        try:
            while True:
                page = (await self.pull(after, PULL_PAGE))["messages"]
                for message in page:
                    self._deliver(message)
                if len(page) < PULL_PAGE:
                    return
                after = str(page[-1]["id"])
        except ClientError as exc:
            log.info("pmq.client: pulling the rest of the inbox stopped: %s", exc)

    # Acks -------------------------------------------------------------------------------
    def _queue_ack(self, message_id: str) -> None:
        self._acks.append(str(message_id))
        self._acks_waiting.set()
        if len(self._acks) >= self.ack_batch:
            self._acks_full.set()

    def _take_acks(self) -> Ids:
        ids, self._acks = self._acks, []
        self._acks_waiting.clear()
        self._acks_full.clear()
        return ids

    async def _ack_loop(self) -> None:
        """Send the queued acks ``ack_delay`` s after the first of them, or at once when
        ``ack_batch`` are waiting; while disconnected they wait for the next hello."""
        while True:
            await self._acks_waiting.wait()
            if not self._acks_full.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ack_delay):
                        await self._acks_full.wait()
            try:
                await self._connection()
            except Stopped:
                return
            for ids in batches(self._take_acks(), self.ack_batch):
                self._spawn(self._send_acks(ids))

    async def _send_acks(self, ids: Ids) -> None:
        """One msg.ack; queued again when its reply never came (acks are idempotent)."""
        try:
            await self.request("msg.ack", {"ids": ids})
        except (ConnectionLost, RequestTimeout):
            self._acks[:0] = ids
            self._acks_waiting.set()
            if len(self._acks) >= self.ack_batch:
                self._acks_full.set()
        except RequestError as exc:
            log.warning("pmq.client: msg.ack of %d ids refused: %s", len(ids), exc)


def batches(ids: Ids, size: int) -> list[Ids]:
    """``ids`` in lists of at most ``size``, in order."""
    return [ids[start : start + size] for start in range(0, len(ids), size)]


def lost(ws: ClientConnection) -> ConnectionLost:
    """The close of a connection that has closed: its code (1006 when none came) and reason."""
    return ConnectionLost(ws.close_code, ws.close_reason or "connection closed")
