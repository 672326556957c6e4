// pmq-client against a real node, with Node's own test runner. tests/test_js_client.py starts
// the node (one socket worker) and runs this file with what it needs in the environment:
// TEST_PMQ_WS_URL, TEST_PMQ_INGEST_URL, TEST_PMQ_JWT_SECRET and TEST_PMQ_STATUS (the JSON argv of
// `pmqctl status --json` for that node).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { afterEach, test } from "node:test";

import { PmqClient, PmqError } from "../index.js";

const {
  TEST_PMQ_WS_URL: PMQ_WS_URL,
  TEST_PMQ_INGEST_URL: PMQ_INGEST_URL,
  TEST_PMQ_JWT_SECRET: PMQ_JWT_SECRET,
  TEST_PMQ_STATUS: PMQ_STATUS,
} = process.env;
const WAIT_MS = 20000;
let nextUid = 5_000_000 + Math.floor(Math.random() * 1_000_000) * 10;

function base64url(value) {
  return Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");
}

/** An HS256 token as the node's auth.jwt_secret checks it. */
function token(uid, role = "user") {
  const now = Math.floor(Date.now() / 1000);
  const head = `${base64url({ alg: "HS256", typ: "JWT" })}.${base64url({ sub: String(uid), iat: now, exp: now + 3600, groups: [], role })}`;
  return `${head}.${createHmac("sha256", PMQ_JWT_SECRET).update(head).digest("base64url")}`;
}

/** Poll `condition` (sync or async) until it gives a truthy value; fail after WAIT_MS. */
async function waitFor(condition, what) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** The site's side: one call to the ingest port; network errors while the node's only socket
 * worker is down are retried (a publish with the same `id` is accepted once). */
async function site(method, path, body) {
  return waitFor(async () => {
    try {
      const response = await fetch(PMQ_INGEST_URL + path, {
        method,
        headers: { "Content-Type": "application/json" },
        body: body && JSON.stringify(body),
      });
      return { status: response.status, reply: await response.json() };
    } catch {
      return null;
    }
  }, `${method} ${path}`);
}

async function publish(uid, text, kind = "notice") {
  const { status, reply } = await site("POST", "/api/v1/messages", {
    to: uid, kind, body: { text }, id: `js-${randomBytes(8).toString("hex")}`,
  });
  assert.ok(status === 202 || status === 200, JSON.stringify(reply));
  return reply.data.ids[0];
}

async function connections(uid) {
  const { reply } = await site("GET", `/api/v1/users/${uid}`);
  return reply.data.connections;
}

function socketWorkers() {
  const [command, ...args] = JSON.parse(PMQ_STATUS);
  const status = JSON.parse(execFileSync(command, args, { encoding: "utf8" }));
  return status.workers.filter((w) => w.kind === "socket" && !w.retiring).map((w) => w.pid);
}

/** A WebSocket constructor that records every socket, every frame sent and every frame
 * received, and drops the requests whose action is in `dropped`. */
function recorder() {
  const record = { sockets: [], sent: [], received: [], dropped: new Set() };
  record.WebSocket = class extends WebSocket {
    constructor(url) {
      super(url);
      record.sockets.push(this);
      this.addEventListener("message", (event) => record.received.push(JSON.parse(event.data)));
    }

    send(data) {
      const frame = JSON.parse(data);
      record.sent.push(frame);
      if (!record.dropped.has(frame.action)) super.send(data);
    }
  };
  record.pushes = (id) => record.received.filter((f) => f.type === "push" && f.msg.id === id).length;
  return record;
}

const clients = [];
afterEach(() => {
  for (const pmq of clients.splice(0)) pmq.close(); // a failed case leaves no timer behind
});

function client(uid, options = {}) {
  const messages = [];
  const pmq = new PmqClient({ url: PMQ_WS_URL, token: () => token(uid), ...options });
  clients.push(pmq);
  pmq.on("message", (msg) => messages.push(msg.id));
  pmq.seen = (id) => messages.filter((m) => m === id).length;
  pmq.messages = messages;
  return pmq;
}

test("a message published while the client is away arrives once when it is back", async () => {
  const uid = nextUid++;
  const record = recorder();
  let tokens = 0;
  let release;
  const gate = new Promise((resolve) => (release = resolve));
  const pmq = client(uid, {
    WebSocket: record.WebSocket,
    autoAck: false,
    token: async () => {
      tokens += 1;
      if (tokens === 2) await gate; // the reconnect waits until the test published
      return token(uid);
    },
  });
  await pmq.connect();
  const first = await publish(uid, "before");
  await waitFor(() => pmq.seen(first), "the first message");

  record.sockets[0].close(); // the connection drops; the client reconnects by itself
  await waitFor(() => tokens === 2, "the token callback called again");
  await waitFor(async () => (await connections(uid)) === 0, "the user offline");
  const second = await publish(uid, "while away");
  release();
  await waitFor(() => pmq.seen(second), "the message published while away");
  await pmq.ping();

  assert.equal(record.pushes(first), 2, "the first message was replayed (not acked)");
  assert.equal(pmq.seen(first), 1, "the replayed duplicate was dropped");
  assert.equal(pmq.seen(second), 1);
  assert.equal(record.sockets.length, 2);
  await pmq.ack([first, second]);
  assert.deepEqual((await pmq.pull()).messages, []);
  pmq.close();
});

test("kill -9 of the socket worker: reconnect, nothing lost, no duplicate delivered", async () => {
  const uid = nextUid++;
  const record = recorder();
  // Nothing is acked before the end: what came before the kill comes again in the replay.
  const pmq = client(uid, { WebSocket: record.WebSocket, backoff: { baseMs: 100 }, autoAck: false });
  let hellos = 0;
  pmq.on("connected", () => (hellos += 1));
  await pmq.connect();
  const [worker] = socketWorkers();
  const ids = [];
  for (let n = 0; n < 30; n++) {
    if (n === 10) {
      await waitFor(() => ids.every((id) => pmq.seen(id)), "the stream before the kill");
      process.kill(worker, "SIGKILL");
    }
    ids.push(await publish(uid, `stream ${n}`));
  }
  await waitFor(() => ids.every((id) => pmq.seen(id)), "every message of the stream");
  assert.ok(hellos >= 2, `reconnected (${hellos} hellos)`);
  assert.notEqual(socketWorkers()[0], worker);
  assert.deepEqual(ids.slice(0, 10).map(record.pushes), Array(10).fill(2), "replayed after the kill");
  assert.deepEqual(ids.filter((id) => pmq.seen(id) !== 1), [], "each delivered once");
  assert.equal(pmq.messages.length, ids.length);
  await pmq.ack(ids);
  assert.deepEqual((await pmq.pull()).messages, []);
});

test("acks go out in batches; a long replay's rest is pulled; the unread counters follow", async () => {
  const uid = nextUid++;
  const ids = [];
  for (let n = 0; n < 25; n++) ids.push(await publish(uid, `waiting ${n}`));
  const record = recorder();
  const pmq = client(uid, { WebSocket: record.WebSocket, ackBatch: 10, ackDelayMs: 200 });
  await pmq.connect();
  await waitFor(() => ids.every((id) => pmq.seen(id)), "the replay and the rest");
  await waitFor(async () => (await pmq.pull()).messages.length === 0, "every message acked");
  // The node replays 20 and says inbox.more: the client pulled the other 5.
  assert.equal(record.received.filter((f) => f.type === "push").length, 20);
  assert.deepEqual(record.received.filter((f) => f.type === "inbox.more").length, 1);
  assert.deepEqual(pmq.messages.sort(), [...ids].sort());

  const acks = record.sent.filter((f) => f.action === "msg.ack").map((f) => f.data.ids);
  assert.ok(acks.length >= 3 && acks.length < ids.length, `${acks.length} msg.ack frames`);
  assert.ok(acks.every((batch) => batch.length <= 10));
  assert.deepEqual(acks.flat().sort(), [...ids].sort());

  await waitFor(() => pmq.unread?.notice === 25, "the counters after the hello");
  await pmq.unreadClear(["notice"]);
  await waitFor(() => pmq.unread.notice === 0, "the unread frame after the clear");
  pmq.close();
});

test("a kick (close 4001) stops the client: no reconnect", async () => {
  const uid = nextUid++;
  const record = recorder();
  let tokens = 0;
  const pmq = client(uid, {
    WebSocket: record.WebSocket,
    backoff: { baseMs: 10 },
    token: () => (tokens += 1) && token(uid),
  });
  const stopped = new Promise((resolve) => pmq.on("stopped", resolve));
  await pmq.connect();
  const { reply } = await site("POST", `/api/v1/users/${uid}/kick`, { reason: "logged out" });
  assert.equal(reply.data.closed, 1);
  assert.deepEqual(await stopped, { reason: "kicked", code: 4001, detail: "logged out" });
  assert.equal(pmq.state, "stopped");
  await assert.rejects(pmq.ping(), (e) => e instanceof PmqError && e.code === "closed");
  assert.equal(await connections(uid), 0);
  assert.equal(tokens, 1, "no new connect");
  assert.equal(record.sockets.length, 1);
});

test("replies: an error code, a timeout, a lost connection", async () => {
  const uid = nextUid++;
  const record = recorder();
  const pmq = client(uid, { WebSocket: record.WebSocket, requestTimeoutMs: 300 });
  await pmq.connect();
  await assert.rejects(pmq.request("no.such"), (e) => e instanceof PmqError && e.code === 404);
  await assert.rejects(pmq.pull({ limit: 5000 }), (e) => e.code === 400 && /limit/.test(e.msg));
  record.dropped.add("ping"); // the server never sees it
  await assert.rejects(pmq.ping(), (e) => e.code === "timeout");
  pmq.close();

  const patient = client(uid, { WebSocket: record.WebSocket, requestTimeoutMs: 60000 });
  await patient.connect();
  const lost = patient.ping();
  record.sockets.at(-1).close();
  await assert.rejects(lost, (e) => e.code === "disconnected");
  record.dropped.clear();
  await patient.ping(); // made while reconnecting: sent after the next hello
  patient.close();
});

test("the network coming back (online) retries at once instead of waiting", async (t) => {
  // What a page's window does; Node's globalThis has no events of its own.
  const window = new EventTarget();
  globalThis.addEventListener = window.addEventListener.bind(window);
  globalThis.removeEventListener = window.removeEventListener.bind(window);
  const random = Math.random;
  Math.random = () => 1; // the whole window: an hour
  t.after(() => {
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
    Math.random = random;
  });
  const uid = nextUid++;
  const record = recorder();
  const pmq = client(uid, { WebSocket: record.WebSocket, backoff: { baseMs: 3600000, capMs: 3600000 } });
  let hellos = 0;
  pmq.on("connected", () => (hellos += 1));
  const gone = new Promise((resolve) => pmq.on("disconnected", resolve));
  await pmq.connect();
  record.sockets[0].close();
  assert.equal((await gone).retryInMs, 3600000);
  window.dispatchEvent(new Event("online"));
  await waitFor(() => hellos === 2, "the reconnect");
  pmq.close();
});

test("a token callback that throws stops the client", async () => {
  const pmq = new PmqClient({
    url: PMQ_WS_URL,
    token: () => {
      throw new Error("signed out");
    },
  });
  const stopped = new Promise((resolve) => pmq.on("stopped", resolve));
  await assert.rejects(pmq.connect(), (e) => e.code === "closed");
  const { reason, error } = await stopped;
  assert.equal(reason, "token");
  assert.equal(error.message, "signed out");
});

test("customer-service chat through the client: cs.* calls and pushes", async () => {
  const agentUid = nextUid++;
  const userUid = nextUid++;
  const agent = client(agentUid, { token: () => token(agentUid, "agent"), autoAck: false });
  const assigned = new Promise((resolve) => agent.on("cs.assigned", resolve));
  await agent.connect();
  const user = client(userUid);
  const closed = new Promise((resolve) => user.on("cs.closed", resolve));
  await user.connect();

  const session = await waitFor(async () => {
    const reply = await user.csOpen();
    return reply.agent === String(agentUid) && reply;
  }, "an agent assigned");
  assert.equal((await assigned).session_id, session.session_id);
  const { id } = await user.csSend(session.session_id, { text: "hello" });
  await waitFor(() => agent.seen(id), "the chat message at the agent");
  const history = await agent.csHistory({ sessionId: session.session_id });
  assert.deepEqual(history.messages.map((m) => m.id), [id]);
  assert.equal((await agent.csSessions()).sessions[0].session_id, session.session_id);
  await agent.ack([id]);
  await agent.csClose(session.session_id);
  assert.equal((await closed).session_id, session.session_id);
  agent.close();
  user.close();
});

test("the notification centre: list, read, and a retraction and an edit as events", async () => {
  const uid = nextUid++;
  const first = await publish(uid, "first");
  const second = await publish(uid, "second");
  const pmq = client(uid);
  const revoked = new Promise((resolve) => pmq.on("revoke", resolve));
  const updated = new Promise((resolve) => pmq.on("update", resolve));
  await pmq.connect();
  const listed = await pmq.list({ kind: "notice" });
  assert.deepEqual(listed.messages.map((m) => [m.id, m.read]), [[second, false], [first, false]]);
  assert.deepEqual(await pmq.read({ ids: [first] }), { read: 1 });
  assert.deepEqual((await pmq.list({ unreadOnly: true })).messages.map((m) => m.id), [second]);
  assert.deepEqual(await pmq.read(), { read: 1 });

  assert.equal((await site("PATCH", `/api/v1/messages/${second}`, { body: { text: "edited" } })).status, 200);
  assert.deepEqual((await updated).msg.body, { text: "edited" });
  assert.equal((await site("DELETE", `/api/v1/messages/${first}`)).status, 200);
  assert.deepEqual(await revoked, { id: first });
});
