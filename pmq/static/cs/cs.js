// PMQ customer-service pages: the client protocol (docs/protocol.md) and message rendering, shared by
// agent.html and chat.html. Plain browser JavaScript, no build step.
"use strict";

(function () {
  const RETRY_FIRST_MS = 500;
  const RETRY_MAX_MS = 10000;
  const REQUEST_TIMEOUT_MS = 10000;

  // The page's token (?token=...) and the WebSocket URL of the node that served the page.
  function pageToken() {
    return new URLSearchParams(window.location.search).get("token") || "";
  }

  function wsUrl(token) {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + window.location.host + "/ws?token=" + encodeURIComponent(token);
  }

  // One connection that reconnects by itself. `handlers.onHello(hello)` runs after each
  // (re)connect; `handlers.onFrame(frame)` gets every frame that is not a reply;
  // `handlers.onState(state)` gets "connecting", "online" or "offline".
  class Client {
    constructor(token, handlers) {
      this.token = token;
      this.handlers = handlers;
      this.pending = new Map();
      this.sequence = 0;
      this.retry = RETRY_FIRST_MS;
      this.ws = null;
      this.uid = null;
    }

    start() {
      this.handlers.onState("connecting");
      const ws = new WebSocket(wsUrl(this.token));
      this.ws = ws;
      ws.onmessage = (event) => this.receive(JSON.parse(event.data));
      ws.onclose = () => {
        this.ws = null;
        for (const [, waiter] of this.pending) waiter.reject(new Error("connection closed"));
        this.pending.clear();
        this.handlers.onState("offline");
        setTimeout(() => this.start(), this.retry);
        this.retry = Math.min(this.retry * 2, RETRY_MAX_MS);
      };
    }

    receive(frame) {
      if (frame.type === "hello") {
        this.retry = RETRY_FIRST_MS;
        this.uid = frame.uid;
        this.handlers.onState("online");
        this.handlers.onHello(frame);
      } else if (frame.type === "reply" && this.pending.has(frame.id)) {
        const waiter = this.pending.get(frame.id);
        this.pending.delete(frame.id);
        clearTimeout(waiter.timer);
        if (frame.code === 200) waiter.resolve(frame.data);
        else waiter.reject(new Error(frame.code + " " + frame.msg));
      } else {
        this.handlers.onFrame(frame);
      }
    }

    // Send one request; resolves with the reply's data, rejects with "CODE msg".
    request(action, data) {
      return new Promise((resolve, reject) => {
        if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
          reject(new Error("not connected"));
          return;
        }
        const id = "c" + ++this.sequence;
        const timer = setTimeout(() => {
          this.pending.delete(id);
          reject(new Error("timed out"));
        }, REQUEST_TIMEOUT_MS);
        this.pending.set(id, { resolve, reject, timer });
        this.ws.send(JSON.stringify({ id: id, action: action, data: data || {} }));
      });
    }

    // Acknowledge displayed messages so they leave the inbox (and stop replaying).
    ack(ids) {
      if (ids.length) this.request("msg.ack", { ids: ids }).catch(() => {});
    }
  }

  function isWebUrl(url) {
    return typeof url === "string" && /^https?:\/\//i.test(url);
  }

  // A message bubble. Text goes in as text (never HTML); images only from http(s) URLs.
  function renderMessage(msg, me) {
    const el = document.createElement("div");
    el.className = "msg" + (msg.from === me ? " mine" : "");
    el.dataset.id = msg.id;
    const body = msg.body || {};
    if (body.image && isWebUrl(body.image.url)) {
      const img = document.createElement("img");
      img.src = body.image.url;
      img.alt = "image";
      img.referrerPolicy = "no-referrer";
      if (body.image.width) img.width = Math.min(body.image.width, 240);
      el.appendChild(img);
    } else {
      el.appendChild(document.createTextNode(String(body.text ?? "")));
    }
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = new Date(msg.ts).toLocaleTimeString();
    el.appendChild(meta);
    return el;
  }

  function notice(text) {
    const el = document.createElement("div");
    el.className = "notice";
    el.textContent = text;
    return el;
  }

  // Messages of one conversation by id, drawn in id order (ids are decimal strings of
  // time-ordered 64-bit integers: compare by length, then lexically).
  function byId(a, b) {
    return a.length - b.length || (a < b ? -1 : a > b ? 1 : 0);
  }

  function drawMessages(container, messages, me, footer) {
    container.replaceChildren();
    const ids = Array.from(messages.keys()).sort(byId);
    for (const id of ids) container.appendChild(renderMessage(messages.get(id), me));
    if (footer) container.appendChild(notice(footer));
    container.scrollTop = container.scrollHeight;
  }

  function setState(el, state) {
    el.textContent = state;
    el.className = "pill " + state;
  }

  // The content of a compose form: text, or an image URL when the image field is filled.
  function composed(textInput, imageInput) {
    const url = imageInput.value.trim();
    if (url) return { image: { url: url } };
    const text = textInput.value;
    return text.trim() ? { text: text } : null;
  }

  window.PMQ = { Client, pageToken, renderMessage, drawMessages, notice, setState, composed, byId };
})();
