// PMQ customer-service pages: what agent.html and chat.html share besides the connection
// (the client module, pmq-client.js): the page's token and message rendering. Plain browser
// JavaScript modules, no build step.
import { compareIds, PmqClient } from "./pmq-client.js";

// The page's connection to the node that served it, with the token of the page's URL
// (?token=...), its state shown on `status`. The page acks what it displays, itself.
export function pageClient(status) {
  const client = new PmqClient({
    token: new URLSearchParams(window.location.search).get("token") || "",
    autoAck: false,
  });
  setState(status, "connecting");
  client.on("connected", () => setState(status, "online"));
  client.on("disconnected", () => setState(status, "offline"));
  client.on("stopped", ({ reason }) => {
    setState(status, "offline");
    status.textContent = "stopped: " + reason;
  });
  return client;
}

function isWebUrl(url) {
  return typeof url === "string" && /^https?:\/\//i.test(url);
}

// A message bubble. Text goes in as text (never HTML); images only from http(s) URLs.
export function renderMessage(msg, me) {
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

export function notice(text) {
  const el = document.createElement("div");
  el.className = "notice";
  el.textContent = text;
  return el;
}

// Messages of one conversation (id -> message), drawn in id order.
export function drawMessages(container, messages, me, footer) {
  container.replaceChildren();
  const ids = Array.from(messages.keys()).sort(compareIds);
  for (const id of ids) container.appendChild(renderMessage(messages.get(id), me));
  if (footer) container.appendChild(notice(footer));
  container.scrollTop = container.scrollHeight;
}

export function setState(el, state) {
  el.textContent = state;
  el.className = "pill " + state;
}

// The content of a compose form: text, or an image URL when the image field is filled.
export function composed(textInput, imageInput) {
  const url = imageInput.value.trim();
  if (url) return { image: { url: url } };
  const text = textInput.value;
  return text.trim() ? { text: text } : null;
}
