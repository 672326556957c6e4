// pmq-client: PMQ's JavaScript client, for browsers and Node (one ES module, no build step, no
// runtime dependency). The protocol it speaks is docs/protocol.md; README.md beside this file
// says what it guarantees.

const MAX_ACK = 1000; // ids per msg.ack, the server's bound
const PULL_LIMIT = 200; // messages per msg.pull page, the server's bound
const DEFAULTS = {
  url: "/ws",
  WebSocket: undefined,
  backoff: { baseMs: 500, capMs: 10000 },
  connectTimeoutMs: 30000,
  requestTimeoutMs: 10000,
  ackDelayMs: 50,
  ackBatch: 100,
  dedupeSize: 10000,
  autoAck: true,
};
// Close codes after which reconnecting would not help: the site asked this user's connections
// to close, or the user opened more than the server allows and this one was the oldest.
const FINAL_CLOSES = { 4001: "kicked", 4008: "too many connections" };
// Handshake statuses that stop reconnecting, where the WebSocket implementation says the
// status (the ws package writes it in its error; browsers and Node's own WebSocket do not).
const FINAL_STATUSES = { 401: "unauthorized", 403: "forbidden" };
const FAILED = Symbol("a listener failed");

/** Order of two message ids (decimal strings of time-ordered 64-bit integers). */
export function compareIds(a, b) {
  return a.length - b.length || (a < b ? -1 : a > b ? 1 : 0);
}

/** A failed request: `code` is the reply's code (400, 403, 404, 409, 429, 500...) or, for a
 * request that got no reply, "timeout", "disconnected" (the connection was lost after it was
 * sent) or "closed" (client.close()). */
export class PmqError extends Error {
  constructor(code, msg) {
    super(typeof code === "number" ? `${code} ${msg}` : msg);
    this.name = "PmqError";
    this.code = code;
    this.msg = msg;
  }
}

function defined(object) {
  return Object.fromEntries(Object.entries(object).filter(([, v]) => v !== undefined));
}

function textOf(data) {
  return typeof data === "string" ? data : new TextDecoder().decode(data);
}

export class PmqClient {
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...options.backoff } };
    this.options.ackBatch = Math.max(1, Math.min(this.options.ackBatch, MAX_ACK));
    // Relative to the page in a browser ("/ws" = the node that served it); absolute in Node.
    try {
      this._url = new URL(this.options.url, globalThis.location?.href);
    } catch {
      throw new TypeError(`pmq-client: url ${this.options.url} must be absolute outside a page`);
    }
    this._url.protocol = this._url.protocol.replace(/^http/, "ws");
    /** "idle", "connecting", "open", "waiting" (to reconnect) or "stopped". */
    this.state = "idle";
    this.uid = null;
    this.connId = null;
    /** The badge counters ({comment, notice, letter, system, cs, total, ...}); null until known. */
    this.unread = null;
    this._unreadFrames = 0; // unread frames so far (unreadGet's reply may be older)
    this._listeners = new Map();
    this._ws = null;
    this._attempt = 0;
    this._helloAt = 0;
    this._sequence = 0;
    this._sent = new Map(); // request id -> waiter, on the wire
    this._outbox = []; // waiters made while not open, sent after the next hello
    this._seen = new Set(); // ids delivered to the application, oldest first
    this._ackQueue = new Set(); // ids to ack, not sent yet
    this._ackSending = new Set(); // ids in a msg.ack not answered yet
    this._ackWaiters = new Map(); // id -> ack() calls waiting for it
    this._ackTimer = null;
    this._retryTimer = null;
    this._connectTimer = null;
    this._idleTimer = null;
    this._started = null;
    this._wake = () => {
      if (globalThis.document?.visibilityState === "hidden") return;
      if (this.state === "waiting") this._open();
      else if (this.state === "open") this._probe();
    };
  }

  // Events ---------------------------------------------------------------------------

  /** Listen to an event: connected, disconnected, message, unread, revoke, update, stopped,
   * cs.assigned, cs.closed, or any other frame type the server sends. */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return this;
  }

  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
    return this;
  }

  /** Run the listeners of `name`; resolves when what they returned (promises) resolved,
   * rejects when one of them failed. A listener that throws is reported on the console and
   * the others still run. */
  _emit(name, value) {
    const results = [];
    for (const fn of [...(this._listeners.get(name) ?? [])]) {
      try {
        results.push(fn(value));
      } catch (error) {
        console.error(`pmq-client: a ${name} listener failed:`, error);
        results.push(FAILED);
      }
    }
    if (results.includes(FAILED)) return Promise.reject(FAILED);
    return Promise.all(results);
  }

  // Connection ---------------------------------------------------------------------------

  /** Start connecting (and reconnecting); resolves with the first hello, rejects when the
   * client stops before it. */
  connect() {
    if (!this._started) {
      this._started = new Promise((resolve, reject) => {
        this._startedResolve = resolve;
        this._startedReject = reject;
      });
      this._started.catch(() => {});
      globalThis.addEventListener?.("online", this._wake);
      globalThis.document?.addEventListener("visibilitychange", this._wake);
      this._open();
    }
    return this._started;
  }

  /** Close for good: pending requests reject with code "closed"; `stopped` is emitted. */
  close() {
    this._stop("closed");
  }

  async _open() {
    clearTimeout(this._retryTimer);
    this.state = "connecting";
    let token;
    try {
      const source = this.options.token;
      token = typeof source === "function" ? await source() : source;
      if (!token) throw new Error("no token");
    } catch (error) {
      this._stop("token", { error });
      return;
    }
    if (this.state !== "connecting") return; // closed while the token was fetched
    const Socket = this.options.WebSocket ?? globalThis.WebSocket;
    if (!Socket) {
      this._stop("no WebSocket", {
        error: new Error("no global WebSocket: pass the ws package's as options.WebSocket"),
      });
      return;
    }
    const url = new URL(this._url);
    url.searchParams.set("token", token);
    const ws = new Socket(url.href);
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    // An error is the end of the socket (Node 20's WebSocket sends no close after a failed
    // connect): it is given up at once.
    ws.onerror = (event) => {
      const message = String(event?.message ?? event?.error?.message ?? "connection failed");
      const status = /\b(40[13])\b/.exec(message);
      if (status && this._helloAt === 0) this._stop(FINAL_STATUSES[status[1]], { code: Number(status[1]) });
      else this._abandon(1006, message);
    };
    ws.onmessage = (event) => this._receive(textOf(event.data));
    ws.onclose = (event) => this._dropped(event.code, event.reason);
    this._connectTimer = setTimeout(
      () => this._abandon(1006, "no hello in time"),
      this.options.connectTimeoutMs,
    );
  }

  /** Give the socket up without waiting for its close event, and carry on as if it closed. */
  _abandon(code, reason) {
    const ws = this._ws;
    if (!ws) return;
    ws.onclose = ws.onmessage = ws.onerror = null;
    try {
      ws.close(4000);
    } catch {
      // already closing
    }
    this._dropped(code, reason);
  }

  /** Forget the socket: requests on the wire reject ("disconnected"); acks not answered
   * wait for the next hello. Returns the socket. */
  _detach() {
    clearTimeout(this._connectTimer);
    clearTimeout(this._idleTimer);
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    const ws = this._ws;
    this._ws = null;
    this._helloAt = 0;
    this.connId = null;
    const sent = [...this._sent.values()];
    this._sent.clear();
    for (const waiter of sent) {
      this._settle(waiter, new PmqError("disconnected", "connection lost before the reply"));
    }
    return ws;
  }

  _dropped(code, reason) {
    this._detach();
    const final = FINAL_CLOSES[code];
    if (final) {
      this._emit("disconnected", { code, reason, retryInMs: null }).catch(() => {});
      this._stop(final, { code, detail: reason });
      return;
    }
    // Full jitter over a window doubling per failed try up to the cap (a hello starts the
    // count again): the clients a node dropped at once come back spread, not as one wave.
    const { baseMs, capMs } = this.options.backoff;
    const delayMs = Math.random() * Math.min(capMs, baseMs * 2 ** this._attempt);
    this._attempt += 1;
    this.state = "waiting";
    this._retryTimer = setTimeout(() => this._open(), delayMs);
    this._emit("disconnected", { code, reason, retryInMs: Math.round(delayMs) }).catch(() => {});
  }

  _stop(reason, details = {}) {
    if (this.state === "stopped") return;
    clearTimeout(this._retryTimer);
    const hadHello = this._helloAt > 0;
    const ws = this._detach();
    this.state = "stopped";
    if (ws) {
      ws.onclose = ws.onmessage = ws.onerror = null;
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
      if (hadHello) this._emit("disconnected", { code: 1000, reason, retryInMs: null }).catch(() => {});
    }
    globalThis.removeEventListener?.("online", this._wake);
    globalThis.document?.removeEventListener("visibilitychange", this._wake);
    const error = new PmqError("closed", `client stopped: ${reason}`);
    for (const waiter of this._outbox) this._settle(waiter, error);
    this._outbox = [];
    for (const waiters of this._ackWaiters.values()) for (const w of waiters) w.reject(error);
    this._ackWaiters.clear();
    this._ackQueue.clear();
    this._startedReject?.(error);
    this._emit("stopped", { reason, ...details }).catch(() => {});
  }

  // Frames in ---------------------------------------------------------------------------

  _receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      console.error("pmq-client: a frame that is not JSON", text);
      return;
    }
    this._idle();
    switch (frame.type) {
      case "hello":
        this._hello(frame);
        break;
      case "reply":
        this._reply(frame);
        break;
      case "push":
        this._deliver(frame.msg);
        break;
      case "unread":
        this._unreadFrames += 1;
        this._setUnread(frame.data);
        break;
      case "inbox.more":
        this._pullRest(frame.after);
        break;
      case "revoke":
        this._emit("revoke", { id: frame.id }).catch(() => {});
        break;
      case "update":
        this._emit("update", { msg: frame.msg }).catch(() => {});
        break;
      default:
        this._emit(frame.type, frame).catch(() => {});
    }
  }

  _hello(frame) {
    clearTimeout(this._connectTimer);
    this.state = "open";
    this._attempt = 0;
    this._helloAt = Date.now();
    this.uid = frame.uid;
    this.connId = frame.conn_id;
    this._heartbeatMs = (frame.heartbeat || 25) * 1000;
    this._idle();
    this._emit("connected", frame).catch(() => {});
    this._startedResolve?.(frame);
    this._flushAcks();
    const outbox = this._outbox;
    this._outbox = [];
    for (const waiter of outbox) this._send(waiter);
    this.unreadGet().catch(() => {}); // counters may have moved while away
  }

  _reply(frame) {
    const waiter = this._sent.get(frame.id);
    if (!waiter) return; // its request timed out already
    this._sent.delete(frame.id);
    if (frame.code === 200) this._settle(waiter, null, frame.data);
    else this._settle(waiter, new PmqError(frame.code, frame.msg));
  }

  /** Hand a message to the application once per id; with autoAck, ack it once every message
   * listener ran (and the promises they returned resolved). A listener that fails leaves
   * the message unacked and forgotten, so the next replay delivers it again. */
  _deliver(msg) {
    if (this._seen.has(msg.id)) return;
    this._seen.add(msg.id);
    if (this._seen.size > this.options.dedupeSize) {
      this._seen.delete(this._seen.values().next().value);
    }
    this._emit("message", msg).then(
      () => this.options.autoAck && this._queueAck(msg.id),
      (error) => {
        if (error !== FAILED) console.error("pmq-client: a message listener failed:", error);
        this._seen.delete(msg.id);
      },
    );
  }

  _setUnread(counters) {
    this.unread = counters;
    this._emit("unread", counters).catch(() => {});
  }

  /** The connect's replay stopped at its bound: page through the rest. */
  async _pullRest(after) {
    try {
      for (;;) {
        const { messages } = await this.pull({ after, limit: PULL_LIMIT });
        for (const msg of messages) this._deliver(msg);
        if (messages.length < PULL_LIMIT) return;
        after = messages[messages.length - 1].id;
      }
    } catch {
      // the next connect replays what is left
    }
  }

  /** After a heartbeat interval without a frame, check the connection with a ping; no
   * answer in requestTimeoutMs means it is gone (a network change, a sleeping laptop). */
  _idle() {
    clearTimeout(this._idleTimer);
    if (this.state === "open") this._idleTimer = setTimeout(() => this._probe(), this._heartbeatMs);
  }

  _probe() {
    const ws = this._ws;
    this.ping().catch((error) => {
      if (error.code === "timeout" && this._ws === ws) this._abandon(1006, "no answer to ping");
    });
  }

  // Requests ---------------------------------------------------------------------------

  /** Send one action; resolves with the reply's data. Rejects with a PmqError: the reply's
   * code and msg, or "timeout" after requestTimeoutMs (counted from this call: a request made
   * while not connected waits for the next hello within that time), or "disconnected", or
   * "closed". */
  request(action, data = {}) {
    return new Promise((resolve, reject) => {
      if (this.state === "stopped") {
        reject(new PmqError("closed", "client stopped"));
        return;
      }
      const id = `c${++this._sequence}`;
      const waiter = { id, action, data, resolve, reject };
      waiter.timer = setTimeout(() => {
        this._sent.delete(id);
        this._outbox = this._outbox.filter((w) => w !== waiter);
        reject(new PmqError("timeout", `${action}: no reply within ${this.options.requestTimeoutMs} ms`));
      }, this.options.requestTimeoutMs);
      if (this.state === "open") this._send(waiter);
      else this._outbox.push(waiter);
    });
  }

  _send(waiter) {
    this._sent.set(waiter.id, waiter);
    this._ws.send(JSON.stringify({ id: waiter.id, action: waiter.action, data: waiter.data }));
  }

  _settle(waiter, error, data) {
    clearTimeout(waiter.timer);
    if (error) waiter.reject(error);
    else waiter.resolve(data);
  }

  ping() {
    return this.request("ping");
  }

  /** Acknowledge messages: they leave the user's inbox on every device. Ids go out in
   * batches (one msg.ack per ackDelayMs or per ackBatch ids); the promise follows the
   * msg.ack that carried them. Ids whose msg.ack got no answer (timeout, lost connection)
   * are sent again, after the next hello if the connection was lost. */
  ack(ids) {
    if (this.state === "stopped") return Promise.reject(new PmqError("closed", "client stopped"));
    const answered = ids.map(
      (id) =>
        new Promise((resolve, reject) => {
          if (!this._ackWaiters.has(id)) this._ackWaiters.set(id, []);
          this._ackWaiters.get(id).push({ resolve, reject });
        }),
    );
    for (const id of ids) this._queueAck(id);
    return Promise.all(answered).then(() => undefined);
  }

  _queueAck(id) {
    if (!this._ackSending.has(id)) this._ackQueue.add(id);
    if (this._ackQueue.size >= this.options.ackBatch) this._flushAcks();
    else this._ackTimer ??= setTimeout(() => this._flushAcks(), this.options.ackDelayMs);
  }

  _flushAcks() {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    if (this.state !== "open" || !this._ackQueue.size) return; // sent after the next hello
    const ids = [...this._ackQueue];
    this._ackQueue.clear();
    for (let start = 0; start < ids.length; start += this.options.ackBatch) {
      this._sendAcks(ids.slice(start, start + this.options.ackBatch));
    }
  }

  _sendAcks(ids) {
    for (const id of ids) this._ackSending.add(id);
    const done = (error) => {
      const unanswered = error && (error.code === "timeout" || error.code === "disconnected");
      for (const id of ids) {
        this._ackSending.delete(id);
        if (unanswered) this._ackQueue.add(id);
        const waiters = this._ackWaiters.get(id) ?? [];
        this._ackWaiters.delete(id);
        for (const waiter of waiters) (error ? waiter.reject(error) : waiter.resolve());
      }
      if (unanswered) this._queueAck(ids[0]);
    };
    this.request("msg.ack", { ids }).then(() => done(null), done);
  }

  /** Unacked messages in id order after `after` ({messages}). */
  pull({ after, limit } = {}) {
    return this.request("msg.pull", defined({ after, limit }));
  }

  /** The badge counters; also kept in client.unread and emitted as `unread`. */
  async unreadGet() {
    // An unread frame that comes while the reply is on its way may be the newer: the server
    // can read the counters for the reply before a change it pushes first.
    const frames = this._unreadFrames;
    const counters = await this.request("unread.get");
    if (this._unreadFrames === frames) this._setUnread(counters);
    return counters;
  }

  /** Set counters to 0 (all kinds when `kinds` is left out); {cleared}. */
  unreadClear(kinds) {
    return this.request("unread.clear", defined({ kinds }));
  }

  /** The notification centre, newest first: {messages (each with `read`), next}. */
  list({ kind, before, limit, unreadOnly } = {}) {
    return this.request("msg.list", defined({ kind, before, limit, unread_only: unreadOnly }));
  }

  /** Mark read: {ids}, {kinds} or {} (everything); {read: n}. */
  read(what = {}) {
    return this.request("msg.read", defined({ ids: what.ids, kinds: what.kinds }));
  }

  /** Open (or get back) this user's customer-service session. */
  csOpen() {
    return this.request("cs.open");
  }

  /** Send {text} or {image: {url, width?, height?}} in a session; {id}. */
  csSend(sessionId, content) {
    return this.request("cs.send", { session_id: sessionId, ...content });
  }

  csClose(sessionId) {
    return this.request("cs.close", { session_id: sessionId });
  }

  /** A session's messages, newest first: {sessionId} or {peer}, with before and limit. */
  csHistory({ sessionId, peer, before, limit } = {}) {
    return this.request("cs.history", defined({ session_id: sessionId, peer, before, limit }));
  }

  /** An agent's open sessions with the last message of each, and the queue's length. */
  csSessions() {
    return this.request("cs.sessions");
  }
}
