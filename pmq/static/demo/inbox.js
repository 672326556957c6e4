// The notification-centre demo (docs/notification-centre.md): the user's feed (msg.list),
// newest first, by kind, a page at a time ("More" asks for the page before `next`). Unread
// items stand out; a click reads one (msg.read by id), "Mark all read" reads the shown kind
// and clears its badge (unread.clear). The badges are the client's unread counters; new
// messages come in at the top, a retracted one (revoke) goes at once, an edited one (update)
// shows its new body. Built on the customer-service pages' connection (token from ?token=).
import { compareIds } from "../cs/pmq-client.js";
import { pageClient } from "../cs/cs.js";

const PAGE = 10;
const KINDS = { comment: "Comment", notice: "Notice", letter: "Letter", system: "System" };
const $ = (id) => document.getElementById(id);

const items = new Map(); // id -> item of the shown kind's pages, with its `read`
const revoked = new Set(); // ids retracted while this page is open: a page listed before is stale
let kind = "all";
let next = null; // the `before` of the next page; null when the last one is shown
let loads = 0; // the current first-page load: the answer to an older one is dropped
let loading = true;
let error = ""; // the last failed call, shown until the next load
const client = pageClient($("status"));

// Does a message belong in the shown list? As msg.list: broadcasts only under all and system.
function fits(msg) {
  return kind === "all" || (msg.kind === kind && (msg.to !== null || kind === "system"));
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  el.className = className;
  if (text !== undefined) el.textContent = text; // text, never HTML
  return el;
}

function origin(msg) {
  if (msg.to === null) return msg.group === "all" ? "to everyone" : "to " + msg.group;
  return msg.from ? "from user " + msg.from : "";
}

function renderItem(msg) {
  const label = KINDS[msg.kind] || msg.kind;
  const el = element("li", "item kind-" + msg.kind + (msg.read ? "" : " unread"));
  el.dataset.id = msg.id;
  el.dataset.kind = msg.kind;
  el.appendChild(element("span", "icon", label.charAt(0).toUpperCase()));
  const content = element("div", "content");
  const meta = element("div", "meta");
  meta.appendChild(element("span", "kind", label));
  meta.appendChild(element("span", "origin", origin(msg)));
  const time = element("time", "", new Date(msg.ts).toLocaleString([], {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  }));
  time.dateTime = new Date(msg.ts).toISOString();
  meta.appendChild(time);
  content.appendChild(meta);
  const body = msg.body || {};
  if (body.title) content.appendChild(element("div", "title", String(body.title)));
  const text = body.text ?? (body.title ? "" : JSON.stringify(body));
  if (text) content.appendChild(element("div", "text", String(text)));
  el.appendChild(content);
  el.appendChild(element("span", "dot"));
  return el;
}

function draw() {
  const ids = Array.from(items.keys()).sort(compareIds).reverse();
  const feed = $("feed");
  feed.replaceChildren(...ids.map((id) => renderItem(items.get(id))));
  if (!ids.length) feed.appendChild(element("li", "empty", loading ? "Loading…" : "Nothing here yet."));
  const unread = ids.filter((id) => !items.get(id).read).length;
  $("note").textContent = error || (ids.length ? unread + " of " + ids.length + " unread" : "");
  $("note").className = "note" + (error ? " error" : "");
  $("more").hidden = next === null;
  $("read-all").disabled = !unread;
}

function drawBadges(counts) {
  for (const tab of $("tabs").querySelectorAll(".tab")) {
    const n = counts ? counts[tab.dataset.kind === "all" ? "total" : tab.dataset.kind] || 0 : 0;
    const badge = tab.querySelector(".badge");
    badge.textContent = n ? String(n) : "";
    badge.dataset.count = String(n);
  }
  const total = counts ? counts.total : 0;
  document.title = (total ? "(" + total + ") " : "") + "Notifications";
}

function adopt(messages) {
  for (const msg of messages) if (!revoked.has(msg.id)) items.set(msg.id, msg);
}

// The shown kind's first page, afresh (after every connect: things changed while away).
async function loadFirst() {
  const load = ++loads;
  items.clear();
  next = null;
  loading = true;
  error = "";
  draw();
  try {
    const page = await client.list({ kind: kind === "all" ? undefined : kind, limit: PAGE });
    if (load !== loads) return;
    adopt(page.messages);
    next = page.next;
    // Pushes that came during the load and are older than the page: "More" lists them.
    for (const id of items.keys()) if (next !== null && compareIds(id, next) < 0) items.delete(id);
  } catch (err) {
    if (load === loads) error = "Could not load: " + err.message;
  } finally {
    if (load === loads) loading = false;
    draw();
  }
}

async function loadMore() {
  const load = loads;
  $("more").disabled = true;
  try {
    const page = await client.list({ kind: kind === "all" ? undefined : kind, before: next, limit: PAGE });
    if (load !== loads) return;
    adopt(page.messages);
    next = page.next;
  } catch (err) {
    error = "Could not load more: " + err.message;
  } finally {
    $("more").disabled = false;
    draw();
  }
}

async function readOne(id) {
  if (!items.has(id) || items.get(id).read) return;
  try {
    await client.read({ ids: [id] });
    if (items.has(id)) items.get(id).read = true; // (an update may have replaced it meanwhile)
  } catch (err) {
    error = "Not marked read: " + err.message;
  }
  draw();
}

// Reads the shown kind (everything under "all") as the feed holds it now, and clears its
// badge. Only the items shown at the click turn read here: later ones are unread.
async function readAll() {
  const shown = Array.from(items.keys());
  const kinds = kind === "all" ? undefined : [kind];
  try {
    await client.read(kinds ? { kinds } : {});
    await client.unreadClear(kinds);
    for (const id of shown) if (items.has(id)) items.get(id).read = true;
  } catch (err) {
    error = "Not marked read: " + err.message;
  }
  draw();
}

function onMessage(msg) {
  if (msg.kind !== "cs") client.ack([msg.id]).catch(() => {}); // delivered; chats: the chat's
  if (!fits(msg) || revoked.has(msg.id) || items.has(msg.id)) return;
  if (next !== null && compareIds(msg.id, next) < 0) return; // below the pages shown
  items.set(msg.id, Object.assign({ read: false }, msg));
  draw();
}

function onRevoke({ id }) {
  revoked.add(id);
  if (items.delete(id)) draw();
}

function onUpdate({ msg }) {
  const old = items.get(msg.id);
  if (!old) return;
  items.set(msg.id, Object.assign({}, msg, { read: old.read }));
  draw();
}

function select(tab) {
  if (tab.dataset.kind === kind) return;
  for (const other of $("tabs").querySelectorAll(".tab")) other.classList.toggle("selected", other === tab);
  kind = tab.dataset.kind;
  loadFirst();
}

client.on("connected", loadFirst);
client.on("message", onMessage);
client.on("revoke", onRevoke);
client.on("update", onUpdate);
client.on("unread", drawBadges);
$("tabs").addEventListener("click", (event) => {
  const tab = event.target.closest(".tab");
  if (tab) select(tab);
});
$("feed").addEventListener("click", (event) => {
  const item = event.target.closest(".item");
  if (item) readOne(item.dataset.id);
});
$("more").addEventListener("click", loadMore);
$("read-all").addEventListener("click", readAll);
drawBadges(null);
draw();
client.connect();
