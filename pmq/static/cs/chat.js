// The user's chat widget: start a session (assigned or queued), send text and image URLs,
// see the agent's replies. Displayed messages are acked; the session id is kept for this tab
// so a reload shows the conversation again (cs.history).
import { composed, drawMessages, pageClient } from "./cs.js";

const $ = (id) => document.getElementById(id);
const messages = new Map();
let client = null;
let sessionId = null;
let agent = null;
let closed = null;
let position = null;

function storageKey() {
  return "pmq-cs-session:" + client.uid;
}

function draw() {
  const active = !!sessionId && !closed;
  $("start").disabled = active || !client.uid;
  $("close").disabled = !active;
  $("send").disabled = !active || !agent;
  if (!sessionId) {
    $("title").textContent = "Need help? Start a chat.";
  } else if (closed) {
    $("title").textContent = "Chat ended (" + closed + ")";
  } else if (agent) {
    $("title").textContent = "Chatting with agent " + agent;
  } else {
    $("title").textContent = "Waiting for an agent…" + (position ? " (position " + position + ")" : "");
  }
  drawMessages($("messages"), messages, client.uid, closed ? "Chat ended (" + closed + ")" : "");
}

function adopt(reply) {
  if (reply.session_id !== sessionId) messages.clear();
  sessionId = reply.session_id;
  agent = reply.agent;
  position = reply.position || null;
  closed = null;
  sessionStorage.setItem(storageKey(), sessionId);
  draw();
}

async function startChat() {
  try {
    adopt(await client.csOpen());
    await loadHistory();
  } catch (err) {
    alert("Could not start: " + err.message);
  }
}

// The conversation so far and the session's state (it may have changed while offline).
async function loadHistory() {
  if (!sessionId) return;
  try {
    const reply = await client.csHistory({ sessionId, limit: 50 });
    for (const m of reply.messages) messages.set(m.id, m);
    agent = reply.session.agent;
    if (reply.session.status === "closed") {
      closed = "closed";
      sessionStorage.removeItem(storageKey());
    }
    draw();
  } catch (err) {
    console.warn("history", err);
  }
}

async function onHello() {
  sessionId = sessionId || sessionStorage.getItem(storageKey());
  draw();
  await loadHistory();
}

function onMessage(m) {
  if (m.kind !== "cs") return; // not this widget's: left in the inbox
  if (m.body.session_id === sessionId) {
    messages.set(m.id, m);
    draw();
  }
  client.ack([m.id]).catch(() => {}); // shown (or of a session that is over): either way, done
}

function onAssigned(frame) {
  if (frame.session_id !== sessionId) return;
  agent = frame.agent;
  position = null;
  draw();
}

function onClosed(frame) {
  if (frame.session_id !== sessionId) return;
  closed = frame.reason === "idle" ? "idle for too long" : "closed";
  sessionStorage.removeItem(storageKey());
  draw();
}

async function send(event) {
  event.preventDefault();
  const content = composed($("text"), $("image-url"));
  if (!content || !sessionId) return;
  try {
    const reply = await client.csSend(sessionId, content);
    messages.set(reply.id, {
      id: reply.id, kind: "cs", from: client.uid, to: agent,
      body: Object.assign({ session_id: sessionId }, content), ts: Date.now(),
    });
    $("text").value = "";
    $("image-url").value = "";
    draw();
  } catch (err) {
    alert("Not sent: " + err.message);
  }
}

client = pageClient($("status"));
client.on("connected", onHello);
client.on("message", onMessage);
client.on("cs.assigned", onAssigned);
client.on("cs.closed", onClosed);
$("start").addEventListener("click", startChat);
$("compose").addEventListener("submit", send);
$("close").addEventListener("click", () => {
  if (sessionId) client.csClose(sessionId).catch((e) => alert(e.message));
});
client.connect();
