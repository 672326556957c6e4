// The agent console: open sessions on the left (unread badges), one chat pane on the right.
// After every (re)connect the server replays the inbox: missed messages are shown, and a
// message is acked once it has been displayed in the pane.
import { compareIds } from "./pmq-client.js";
import { composed, drawMessages, pageClient } from "./cs.js";

const $ = (id) => document.getElementById(id);
const sessions = new Map(); // session id -> {user, messages: Map, unacked: Set, closed, el}
let selected = null;
let client = null;

function session(sid, user) {
  let s = sessions.get(sid);
  if (!s) {
    s = { user: user, messages: new Map(), unacked: new Set(), closed: null, el: null };
    sessions.set(sid, s);
  }
  if (user && !s.user) s.user = user;
  return s;
}

function lastText(s) {
  const ids = Array.from(s.messages.keys()).sort(compareIds);
  if (!ids.length) return "";
  const last = s.messages.get(ids[ids.length - 1]);
  return last.body.image ? "[image]" : String(last.body.text ?? "");
}

function drawList() {
  const list = $("sessions");
  list.replaceChildren();
  for (const [sid, s] of sessions) {
    const item = document.createElement("div");
    item.className = "session" + (sid === selected ? " selected" : "") + (s.closed ? " closed" : "");
    item.dataset.session = sid;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = "User " + s.user + (s.closed ? " (closed)" : "");
    const last = document.createElement("span");
    last.className = "last";
    last.textContent = lastText(s);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.count = String(s.unacked.size);
    badge.textContent = s.unacked.size ? String(s.unacked.size) : "";
    item.append(who, last, badge);
    item.addEventListener("click", () => select(sid));
    list.appendChild(item);
  }
}

// Draw the selected session and ack what it shows.
function drawPane() {
  const s = selected && sessions.get(selected);
  $("send").disabled = $("close").disabled = !s || !!s.closed;
  if (!s) return;
  $("title").textContent = "Session " + selected + " with user " + s.user;
  const footer = s.closed ? "Session closed (" + s.closed + ")" : "";
  drawMessages($("messages"), s.messages, client.uid, footer);
  if (s.unacked.size) {
    client.ack(Array.from(s.unacked)).catch(() => {}); // sent again after a reconnect
    s.unacked.clear();
    if (Array.from(sessions.values()).every((x) => !x.unacked.size)) {
      client.unreadClear(["cs"]).catch(() => {});
    }
  }
  drawList();
}

async function select(sid) {
  selected = sid;
  drawPane();
  try {
    const reply = await client.csHistory({ sessionId: sid, limit: 50 });
    const s = sessions.get(sid);
    for (const m of reply.messages) s.messages.set(m.id, m);
    if (selected === sid) drawPane();
  } catch (err) {
    console.warn("history", err);
  }
}

async function refreshSessions() {
  try {
    const reply = await client.csSessions();
    $("queue").textContent = String(reply.queued);
    for (const item of reply.sessions) {
      const s = session(item.session_id, item.user);
      s.closed = null;
      if (item.last) s.messages.set(item.last.id, item.last);
    }
    if (!selected && reply.sessions.length) select(reply.sessions[0].session_id);
    else drawPane();
    drawList();
  } catch (err) {
    console.warn("sessions", err);
  }
}

function onMessage(m) {
  if (m.kind !== "cs") return; // not this console's: left in the inbox
  const s = session(m.body.session_id, m.from);
  s.messages.set(m.id, m);
  s.unacked.add(m.id);
  if (m.body.session_id === selected) drawPane();
  else drawList();
}

function onAssigned(frame) {
  session(frame.session_id, frame.user).closed = null;
  if (!selected) select(frame.session_id);
  refreshSessions();
}

function onClosed(frame) {
  const s = sessions.get(frame.session_id);
  if (s) s.closed = frame.reason + (frame.by ? " by " + frame.by : "");
  if (frame.session_id === selected) drawPane();
  refreshSessions();
}

async function send(event) {
  event.preventDefault();
  const content = composed($("text"), $("image-url"));
  if (!content || !selected) return;
  const sid = selected;
  try {
    const reply = await client.csSend(sid, content);
    const s = sessions.get(sid);
    s.messages.set(reply.id, {
      id: reply.id, kind: "cs", from: client.uid, to: s.user,
      body: Object.assign({ session_id: sid }, content), ts: Date.now(),
    });
    $("text").value = "";
    $("image-url").value = "";
    drawPane();
  } catch (err) {
    alert("Not sent: " + err.message);
  }
}

function start() {
  client = pageClient($("status"));
  client.on("connected", () => refreshSessions().then(() => selected && select(selected)));
  client.on("message", onMessage);
  client.on("cs.assigned", onAssigned);
  client.on("cs.closed", onClosed);
  client.on("unread", (counters) => ($("unread").textContent = String(counters.cs)));
  $("compose").addEventListener("submit", send);
  $("close").addEventListener("click", () => {
    if (selected) client.csClose(selected).catch((e) => alert(e.message));
  });
  client.connect();
}

start();
