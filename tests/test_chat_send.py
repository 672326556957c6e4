"""chat.send on a real Redis: one chat script checks and keeps the message, then the inbox
accepts it for the peer; the history and the inbox hold the same message."""

from __future__ import annotations

import asyncio

import pytest
from redis.crc import key_slot

from pmq.config import CsConfig
from pmq.domain.chat import Chat
from pmq.domain.ids import IdGenerator
from pmq.domain.inbox import Inbox
from pmq.domain.routing import Routes
from pmq.errors import ActionError
from pmq.redis import scripts
from pmq.redis.keys import Keys
from pmq.wire import storeops
from tests.helpers import REDIS_URL
from tests.test_redis_cluster import Recording


def test_a_send_is_one_chat_script_then_the_inbox_publish(redis_prefix: str) -> None:
    keys = Keys(redis_prefix, 8)

    async def scenario() -> None:
        client = Recording.from_url(REDIS_URL)
        client.scripts = []
        try:
            routes = Routes(client, keys, "w1", 1.0)
            inbox = Inbox(client, keys, IdGenerator(3), 86400, 3600)
            chat = Chat(client, keys, routes, inbox, CsConfig, 3600)
            await routes.register("900", "c900")
            await chat.agent_online("900")
            sid = (await chat.open("101"))["session_id"]
            # Loaded now, so that the calls recorded below are the send's own and not a
            # NOSCRIPT's retry (another test may have flushed Redis's scripts).
            await client.script_load(scripts.source("chat_send"))
            client.scripts = []
            message_id = await chat.send("900", sid, {"text": "hi"})
            # The chat's part is one script (the inbox's goes through the batch's own
            # connection, which this client does not see).
            chat_slot = key_slot(keys.cs_session(sid).encode())
            assert [{key_slot(k.encode()) for k in call} for call in client.scripts] == [
                {chat_slot}
            ]
            kept = await client.hget(keys.cs_bodies(sid), message_id)
            delivered = await client.hget(keys.inbox_bodies("101"), message_id)
            assert kept is not None and kept == delivered
            queued = await client.lrange(keys.store_queue("cs"), 0, -1)
            assert queued == [storeops.encode_cs_message(sid, kept)]
            session = await client.hmget(keys.cs_session(sid), ["last", "last_id", "count"])
            assert session == [kept, message_id.encode(), b"1"]

            await chat.close(sid, "101")
            client.scripts = []
            with pytest.raises(ActionError) as refused:
                await chat.send("900", sid, {"text": "late"})
            assert refused.value.code == 409
            assert len(client.scripts) == 1  # refused by the chat script: nothing sent
            assert await client.hlen(keys.cs_bodies(sid)) == 1
        finally:
            await client.aclose()

    asyncio.run(scenario())
