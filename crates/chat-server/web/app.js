// The chat's browser client. No framework, no build step: it speaks the
// protocol in asyncapi.yaml over /ws and asks /whoami who it is.
//
// Safety: every piece of text that comes from the network is put into the
// page with textContent, never as HTML.
"use strict";

const MAX_CHARS = 500; // the protocol's limit, in Unicode scalar values
const NAME_KEY = "chat.name";
const PICKER_EMOJIS = ["👍", "❤️", "😂", "🎉", "😮", "😢", "🙏", "🔥"];
const NOTICE_MS = 6000;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15000;
// Near enough to the bottom to keep following new messages.
const STICK_PX = 48;
// The most messages the page keeps (the server's default history is
// 10,000); beyond it the oldest leave the list, so a tab left open for
// weeks does not grow without bound.
const MAX_KEPT = 10000;
const TITLE = document.title;
// The operator key of a moderator (`/?moderate`): kept in this tab's
// sessionStorage only, never in a cookie or a URL, and sent only in the
// Authorization header of the operator API's requests.
const MODERATOR_KEY = "chat.moderatorKey";
const MODERATING = new URLSearchParams(location.search).has("moderate");
const TIME_OUT_SECONDS = 600;

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  statusText: $("status-text"),
  retry: $("retry"),
  scroller: $("scroller"),
  empty: $("empty"),
  list: $("messages"),
  jump: $("jump"),
  notices: $("notices"),
  form: $("composer"),
  name: $("name"),
  text: $("text"),
  counter: $("counter"),
  send: $("send"),
  picker: $("picker"),
  announcer: $("announcer"),
  moderator: $("moderator"),
  moderatorState: $("moderator-state"),
  moderatorKey: $("moderator-key"),
  moderatorForget: $("moderator-forget"),
  slowMode: $("slow-mode"),
  restricted: $("restricted"),
  roomMode: $("room-mode"),
};

/** @type {Map<string, {message: object, el: HTMLLIElement, seen: number}>} */
const messages = new Map();
let me = null; // this client's user id, from /whoami
let socket = null;
let connection = 0; // counts connections; marks which one saw a message
let lastInStream = null; // id of the previous message frame on this connection
// Where this page is in the server's log: the last `sync` frame's epoch and
// position. A reconnect asks for what came after it (`?since=&epoch=`)
// instead of the whole history.
let synced = null;
// Whether this connection replays the whole history (the first connection,
// or after a `reset`): then, at its first `sync`, messages the replay did
// not bring are dropped.
let fullReplay = true;
let retryTimer = 0;
let attempts = 0;
// Commands sent on this connection whose outcome has not come back: the
// texts of messages (given back if the server refuses one) and a count of
// reaction toggles. An error frame does not say which command it refuses,
// so these tell a refused message from a refused reaction.
let sentTexts = [];
let sentReactions = 0;
let pickerFor = null; // the "add reaction" button the picker belongs to
let stuck = true; // following the newest message (the reader has not scrolled up)
let replaying = true; // what the connection sends before its first `sync` (a replay, or what was missed)
let unread = 0; // live messages from others while the tab was hidden

// ---- connection ----------------------------------------------------------

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = synced
    ? `?since=${synced.position}&epoch=${encodeURIComponent(synced.epoch)}`
    : "?sync";
  return scheme + "//" + location.host + "/ws" + query;
}

function connect() {
  clearTimeout(retryTimer);
  setStatus("connecting", attempts ? "Reconnecting…" : "Connecting…");
  connection += 1;
  sentTexts = [];
  sentReactions = 0;
  replaying = true;
  fullReplay = synced === null;
  // A resume continues the list where it ends; a replay rebuilds it from
  // the top.
  lastInStream = fullReplay ? null : lastShownId();
  const ws = new WebSocket(wsUrl());
  socket = ws;
  ws.addEventListener("open", () => {
    if (socket !== ws) return;
    attempts = 0;
    setStatus("open", "Connected");
    updateComposer();
    whoami();
  });
  ws.addEventListener("message", (event) => {
    if (socket === ws) onFrame(event.data);
  });
  ws.addEventListener("close", (event) => {
    if (socket !== ws) return;
    socket = null;
    updateComposer();
    scheduleReconnect(event);
  });
}

function scheduleReconnect(event) {
  attempts += 1;
  // Exponential backoff with jitter, so a restarted server is not hit by
  // every page in the same instant.
  // From the first attempt: after a 1013 or a restart, every page
  // reconnects at once otherwise.
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (attempts - 1));
  const delay = base / 2 + Math.random() * (base / 2);
  const why = closeText(event);
  setStatus("closed", `${why} Reconnecting in ${Math.ceil(delay / 1000)} s…`, true);
  retryTimer = setTimeout(connect, delay);
}

function closeText(event) {
  switch (event.code) {
    case 1001: return "The server is restarting.";
    case 1008: return `Disconnected (${event.reason || "policy"}).`;
    case 1009: return "Disconnected: a message was too big.";
    case 1013: return "Disconnected: the connection was too slow.";
    default: return "Disconnected.";
  }
}

function setStatus(state, text, canRetry = false) {
  ui.status.dataset.state = state;
  ui.statusText.textContent = text;
  ui.retry.hidden = !canRetry;
}

async function whoami() {
  try {
    const response = await fetch("/whoami", { cache: "no-store" });
    if (!response.ok) return;
    const body = await response.json();
    if (typeof body.user_id === "string" && body.user_id !== me) {
      me = body.user_id;
      for (const entry of messages.values()) render(entry);
    }
  } catch {
    // Offline: the next connection asks again.
  }
}

// ---- frames --------------------------------------------------------------

// Frames are handled in batches, once per animation frame (or every 100 ms
// in a hidden tab, where animation frames stop): a history replay of 10,000
// messages then costs one layout, not 10,000.
let inbox = [];
let flushPending = false;

function onFrame(data) {
  inbox.push(data);
  if (flushPending) return;
  flushPending = true;
  if (document.hidden) setTimeout(flush, 100);
  else requestAnimationFrame(flush);
}

function flush() {
  flushPending = false;
  const batch = inbox;
  inbox = [];
  const follow = stuck || atBottom();
  let ownNew = false;
  let othersNew = 0;
  for (const data of batch) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      continue;
    }
    const body = frame && frame.data;
    switch (frame && frame.type) {
      case "message": {
        const created = upsert(body, true);
        if (created && body.author_id === me) ownNew += 1;
        else if (created) othersNew += 1;
        if (created && !replaying && body.author_id !== me) announce(body);
        break;
      }
      case "reaction_updated":
        if (body && body.user_id === me && sentReactions > 0) sentReactions -= 1;
        // A message this page does not hold (dropped from its list) is not
        // added out of place; the next replay brings it where it belongs.
        if (body && body.message && messages.has(body.message.id)) upsert(body.message, false);
        break;
      case "error":
        onError(body && body.error);
        break;
      case "reset":
        // The server cannot resume where this page was: the whole history
        // follows, and what it does not bring is dropped at the `sync`.
        fullReplay = true;
        lastInStream = null;
        break;
      case "message_removed":
        if (body && typeof body.message_id === "string") removeMessage(body.message_id);
        break;
      case "user_restricted":
        if (body && body.user_id === me) showRestriction(body.until, body.reason);
        break;
      case "restriction_lifted":
        if (body && body.user_id === me) showRestriction(undefined);
        break;
      case "room_updated":
        if (body) showRoom(body.slow_mode_seconds);
        break;
      case "sync":
        if (body && typeof body.epoch === "string" && Number.isSafeInteger(body.position)) {
          synced = { epoch: body.epoch, position: body.position };
          if (replaying) endReplay();
        }
        break;
      default:
        break; // a newer server's frame: ignore it
    }
  }
  trim();
  ui.empty.hidden = messages.size > 0;
  // Follow the conversation, and always show the user their own message.
  if (follow || ownNew > 0) scrollToBottom();
  else if (othersNew > 0) ui.jump.hidden = false;
  if (othersNew > 0 && document.hidden && !replaying) {
    unread += othersNew;
    document.title = `(${unread}) ${TITLE}`;
  }
}

function onError(text) {
  notify(typeof text === "string" ? text : "The server refused that.");
  // A restriction this page was not told of live (it began before the
  // page connected): show it, with its end, until it ends.
  const timedOut = /^You are timed out until (\S+)\.$/.exec(String(text));
  if (timedOut && !Number.isNaN(Date.parse(timedOut[1]))) {
    showRestriction(Date.parse(timedOut[1]) / 1000);
  } else if (/^You are banned/.test(String(text))) {
    showRestriction(null);
  }
  if (!refusesAMessage(text)) {
    if (sentReactions > 0) sentReactions -= 1;
    return;
  }
  // Give back the refused message's text, unless the user typed since.
  const refused = sentTexts.shift();
  if (refused !== undefined && ui.text.value === "") {
    ui.text.value = refused;
    updateComposer();
  }
}

/**
 * Whether an error frame refuses a message rather than a reaction. When
 * only one kind is waiting for its outcome, it is that kind; with both,
 * the reaction refusals are the ones about emojis, reactions, or a
 * message that is not there.
 */
function refusesAMessage(text) {
  if (sentTexts.length === 0) return false;
  if (sentReactions === 0) return true;
  return !/emoji|reaction|message not found/i.test(String(text));
}

/**
 * Adds a message or updates it in place; `inStream` keeps server order.
 * Returns whether the message is new to the list.
 */
function upsert(message, inStream) {
  if (!message || typeof message.id !== "string") return false;
  let entry = messages.get(message.id);
  const created = !entry;
  if (entry) {
    entry.message = message;
  } else {
    const el = document.createElement("li");
    el.className = "msg";
    el.dataset.id = message.id;
    el.dataset.author = message.author_id;
    entry = { message, el, seen: connection };
    messages.set(message.id, entry);
    const prev = inStream && lastInStream && messages.get(lastInStream);
    if (prev) {
      prev.el.after(el);
    } else if (inStream && lastInStream === null) {
      ui.list.prepend(el);
    } else {
      ui.list.append(el);
    }
  }
  if (inStream) {
    entry.seen = connection;
    lastInStream = message.id;
  }
  // Before /whoami answers, `me` is unknown: match by text alone.
  if (inStream && (me === null || message.author_id === me)) {
    const i = sentTexts.indexOf(message.text);
    if (i >= 0) sentTexts.splice(i, 1);
  }
  render(entry);
  return created;
}

/** Keeps the list within MAX_KEPT messages, dropping the oldest. */
function trim() {
  while (messages.size > MAX_KEPT) {
    const first = ui.list.firstElementChild;
    if (!first) break;
    messages.delete(first.dataset.id);
    first.remove();
  }
}

/** Tells screen readers about a live message from someone else. */
function announce(message) {
  ui.announcer.textContent = `${message.author_name}: ${message.text}`;
}

/** The id of the last message in the list, if any. */
function lastShownId() {
  const last = ui.list.lastElementChild;
  return last ? last.dataset.id : null;
}

/**
 * The connection's first `sync`: what came before it was the replay (or,
 * resuming, what the page missed). After a full replay, drop what the
 * server no longer has.
 */
function endReplay() {
  replaying = false;
  if (!fullReplay) return;
  fullReplay = false;
  for (const [id, entry] of messages) {
    if (entry.seen !== connection) {
      entry.el.remove();
      messages.delete(id);
    }
  }
  ui.empty.hidden = messages.size > 0;
}

/** Takes a message a moderator removed out of the list. */
function removeMessage(id) {
  const entry = messages.get(id);
  if (!entry) return;
  if (pickerFor && pickerFor.dataset.message === id) closePicker(false);
  if (lastInStream === id) {
    const prev = entry.el.previousElementSibling;
    lastInStream = prev ? prev.dataset.id : null;
  }
  entry.el.remove();
  messages.delete(id);
  ui.empty.hidden = messages.size > 0;
}

/**
 * Shows (or, with `until` undefined, hides) this user's restriction:
 * `until` in Unix seconds, or null for a ban.
 */
function showRestriction(until, reason) {
  if (until === undefined) {
    ui.restricted.hidden = true;
    ui.restricted.textContent = "";
    return;
  }
  const why = reason ? ` Reason: ${reason}` : "";
  ui.restricted.textContent =
    until === null
      ? `A moderator banned you from posting.${why}`
      : `A moderator timed you out until ${new Date(until * 1000).toLocaleString()}.${why}`;
  ui.restricted.hidden = false;
  if (until !== null) {
    const left = until * 1000 - Date.now();
    // Past its end, the time-out no longer holds: hide it then.
    if (left < 2 ** 31) setTimeout(() => showRestriction(undefined), Math.max(0, left));
  }
}

function showRoom(slowSeconds) {
  const n = Number(slowSeconds) || 0;
  ui.roomMode.hidden = n === 0;
  ui.roomMode.textContent = n ? `Slow mode: one message every ${n} seconds.` : "";
  if ([...ui.slowMode.options].some((o) => o.value === String(n))) ui.slowMode.value = String(n);
}

// ---- moderating ----------------------------------------------------------

function moderatorKey() {
  return sessionStorage.getItem(MODERATOR_KEY);
}

/** Calls the operator API; the JSON answer, or throws with its error. */
async function operator(method, path, body) {
  const key = moderatorKey();
  if (!key) throw new Error("Enter your operator key first.");
  const response = await fetch("/admin/" + path, {
    method,
    cache: "no-store",
    headers: {
      Authorization: `Bearer ${key}`,
      ...(body ? { "Content-Type": "application/json" } : {}),
    },
    body: body ? JSON.stringify(body) : undefined,
  });
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    // Not JSON: the status says enough.
  }
  if (!response.ok) {
    if (response.status === 401) forgetKey("That key was refused.");
    throw new Error((answer && answer.error) || `The server answered ${response.status}.`);
  }
  return answer;
}

async function useKey(key) {
  sessionStorage.setItem(MODERATOR_KEY, key);
  try {
    const room = await operator("GET", "room");
    ui.moderatorState.textContent = "Moderating: each message has remove and time-out buttons.";
    ui.moderatorKey.hidden = true;
    $("moderator-use").hidden = true;
    ui.moderatorForget.hidden = false;
    ui.slowMode.disabled = false;
    document.body.classList.add("moderating");
    showRoom(room && room.slow_mode_seconds);
    for (const entry of messages.values()) render(entry);
  } catch (error) {
    notify(String(error.message || error));
  }
}

function forgetKey(why) {
  sessionStorage.removeItem(MODERATOR_KEY);
  document.body.classList.remove("moderating");
  ui.moderatorKey.hidden = false;
  ui.moderatorKey.value = "";
  $("moderator-use").hidden = false;
  ui.moderatorForget.hidden = true;
  ui.slowMode.disabled = true;
  ui.moderatorState.textContent = why || "Enter your operator key once; it is kept for this tab only.";
  for (const entry of messages.values()) render(entry);
}

function isModerating() {
  return MODERATING && document.body.classList.contains("moderating");
}

async function removeByModerator(message) {
  try {
    await operator("POST", "remove_message", { message_id: message.id });
  } catch (error) {
    notify(`Not removed: ${error.message || error}`);
  }
}

async function timeOutAuthor(message) {
  try {
    await operator("POST", "restrict_user", {
      user_id: message.author_id,
      term: { seconds: TIME_OUT_SECONDS },
    });
    notify(`${message.author_name} is timed out for ${TIME_OUT_SECONDS / 60} minutes.`);
  } catch (error) {
    notify(`Not timed out: ${error.message || error}`);
  }
}

if (MODERATING) {
  ui.moderator.hidden = false;
  ui.moderator.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = ui.moderatorKey.value.trim();
    if (key) useKey(key);
  });
  ui.moderatorForget.addEventListener("click", () => forgetKey());
  ui.slowMode.addEventListener("change", async () => {
    try {
      await operator("POST", "set_room", { slow_mode_seconds: Number(ui.slowMode.value) });
    } catch (error) {
      notify(`Slow mode not changed: ${error.message || error}`);
    }
  });
  if (moderatorKey()) useKey(moderatorKey());
}

// ---- rendering -----------------------------------------------------------

function render(entry) {
  const m = entry.message;
  const el = entry.el;
  const own = m.author_id === me;
  el.classList.toggle("own", own);
  el.replaceChildren();

  const meta = document.createElement("div");
  meta.className = "meta";
  const author = document.createElement("span");
  author.className = "author";
  author.textContent = m.author_name;
  if (own) {
    const you = document.createElement("span");
    you.className = "you";
    you.textContent = " (you)";
    author.append(you);
  }
  const time = document.createElement("time");
  const when = new Date(m.created_at * 1000);
  time.dateTime = when.toISOString();
  time.title = when.toLocaleString();
  time.dataset.at = String(m.created_at);
  time.textContent = relative(m.created_at);
  meta.append(author, time);

  const text = document.createElement("p");
  text.className = "text";
  text.textContent = m.text;

  const reactions = document.createElement("div");
  reactions.className = "reactions";
  reactions.setAttribute("role", "group");
  reactions.setAttribute("aria-label", "Reactions");
  for (const [emoji, users] of Object.entries(m.reactions || {})) {
    if (!Array.isArray(users) || users.length === 0) continue;
    const mine = me !== null && users.includes(me);
    const button = document.createElement("button");
    button.type = "button";
    button.className = "reaction";
    button.dataset.emoji = emoji;
    button.setAttribute("aria-pressed", String(mine));
    const count = users.length;
    button.setAttribute(
      "aria-label",
      `${emoji} ${count} ${count === 1 ? "reaction" : "reactions"}${mine ? ", including yours" : ""}`,
    );
    const glyph = document.createElement("span");
    glyph.textContent = emoji;
    glyph.setAttribute("aria-hidden", "true");
    const number = document.createElement("span");
    number.className = "count";
    number.textContent = String(count);
    number.setAttribute("aria-hidden", "true");
    button.append(glyph, number);
    button.addEventListener("click", () => react(m.id, emoji));
    reactions.append(button);
  }
  const add = document.createElement("button");
  add.type = "button";
  add.className = "add-reaction";
  add.setAttribute("aria-label", "Add a reaction");
  add.setAttribute("aria-expanded", "false");
  add.textContent = "☺ +";
  add.addEventListener("click", () => togglePicker(add, m.id));
  reactions.append(add);

  if (isModerating()) {
    const tools = document.createElement("div");
    tools.className = "mod-tools";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "mod-remove";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove this message by ${m.author_name}`);
    remove.addEventListener("click", () => removeByModerator(m));
    const timeOut = document.createElement("button");
    timeOut.type = "button";
    timeOut.className = "mod-timeout";
    timeOut.textContent = "Time out author";
    timeOut.setAttribute("aria-label", `Time ${m.author_name} out for ${TIME_OUT_SECONDS / 60} minutes`);
    timeOut.addEventListener("click", () => timeOutAuthor(m));
    tools.append(remove, timeOut);
    meta.append(tools);
  }

  // Re-rendering must not lose an open picker or the keyboard focus.
  const focused = el.contains(document.activeElement) ? focusKey(document.activeElement) : null;
  el.append(meta, text, reactions);
  if (pickerFor && pickerFor.dataset.message === m.id) {
    add.dataset.message = m.id;
    add.setAttribute("aria-expanded", "true");
    pickerFor = add;
    reactions.append(ui.picker);
  }
  add.dataset.message = m.id;
  if (focused) {
    const again = el.querySelector(focused);
    if (again) again.focus();
  }
}

function focusKey(node) {
  if (node.classList.contains("reaction")) return `.reaction[data-emoji="${CSS.escape(node.dataset.emoji)}"]`;
  if (node.classList.contains("add-reaction")) return ".add-reaction";
  return null;
}

const relativeFormat = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

function relative(seconds) {
  const diff = seconds - Date.now() / 1000;
  const abs = Math.abs(diff);
  if (abs < 45) return "just now";
  const units = [
    [60, "second"],
    [60, "minute"],
    [24, "hour"],
    [7, "day"],
    [4.35, "week"],
    [12, "month"],
    [Infinity, "year"],
  ];
  let value = diff;
  for (const [size, unit] of units) {
    if (Math.abs(value) < size) return relativeFormat.format(Math.round(value), unit);
    value /= size;
  }
  return "";
}

function refreshTimes() {
  for (const time of ui.list.querySelectorAll("time[data-at]")) {
    time.textContent = relative(Number(time.dataset.at));
  }
}

// ---- scrolling -----------------------------------------------------------

function atBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < STICK_PX;
}

function scrollToBottom() {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
  ui.jump.hidden = true;
  stuck = true;
}

// ---- reactions -----------------------------------------------------------

function react(messageId, emoji) {
  if (sendFrame({ type: "add_reaction", data: { message_id: messageId, emoji } })) {
    sentReactions += 1;
  }
}

function togglePicker(button, messageId) {
  if (pickerFor === button) {
    closePicker(true);
    return;
  }
  closePicker(false);
  pickerFor = button;
  button.dataset.message = messageId;
  button.setAttribute("aria-expanded", "true");
  ui.picker.replaceChildren(
    ...PICKER_EMOJIS.map((emoji) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = emoji;
      b.setAttribute("aria-label", `React with ${emoji}`);
      b.addEventListener("click", () => {
        react(pickerFor.dataset.message, emoji);
        closePicker(true);
      });
      return b;
    }),
  );
  button.parentElement.append(ui.picker);
  ui.picker.hidden = false;
  ui.picker.querySelector("button").focus();
}

function closePicker(refocus) {
  if (!pickerFor) return;
  const button = pickerFor;
  pickerFor = null;
  button.setAttribute("aria-expanded", "false");
  ui.picker.hidden = true;
  document.body.append(ui.picker);
  if (refocus && button.isConnected) button.focus();
}

ui.picker.addEventListener("keydown", (event) => {
  const buttons = [...ui.picker.querySelectorAll("button")];
  const i = buttons.indexOf(document.activeElement);
  if (event.key === "Escape") {
    event.preventDefault();
    closePicker(true);
  } else if (event.key === "ArrowRight" || event.key === "ArrowDown") {
    event.preventDefault();
    buttons[(i + 1) % buttons.length].focus();
  } else if (event.key === "ArrowLeft" || event.key === "ArrowUp") {
    event.preventDefault();
    buttons[(i - 1 + buttons.length) % buttons.length].focus();
  }
});

document.addEventListener("click", (event) => {
  if (pickerFor && !ui.picker.contains(event.target) && event.target !== pickerFor) {
    closePicker(false);
  }
});

// ---- composing -----------------------------------------------------------

function chars(text) {
  // Code points, as the server counts (a UTF-16 length would count an
  // emoji twice).
  let n = 0;
  for (const _ of text) n += 1;
  return n;
}

function updateComposer() {
  const n = chars(ui.text.value);
  const over = n > MAX_CHARS;
  ui.counter.textContent = `${n} / ${MAX_CHARS}`;
  ui.counter.classList.toggle("over", over);
  ui.text.setAttribute("aria-invalid", String(over));
  ui.send.disabled = over || ui.text.value.trim() === "" || !isOpen();
}

function isOpen() {
  return socket !== null && socket.readyState === WebSocket.OPEN;
}

function sendFrame(frame) {
  if (!isOpen()) {
    notify("Not connected. Waiting to reconnect…");
    return false;
  }
  socket.send(JSON.stringify(frame));
  return true;
}

function submit() {
  const text = ui.text.value;
  if (text.trim() === "") return;
  if (chars(text) > MAX_CHARS) {
    notify(`Message too long (max ${MAX_CHARS} characters).`);
    return;
  }
  const name = ui.name.value.trim();
  const data = name ? { text, author_name: name } : { text };
  if (!sendFrame({ type: "send_message", data })) return;
  sentTexts.push(text);
  ui.text.value = "";
  updateComposer();
  scrollToBottom();
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});

ui.text.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});

ui.text.addEventListener("input", updateComposer);

ui.name.value = localStorage.getItem(NAME_KEY) || "";
ui.name.addEventListener("input", () => {
  const name = ui.name.value.trim();
  if (name) localStorage.setItem(NAME_KEY, name);
  else localStorage.removeItem(NAME_KEY);
});

// ---- notices -------------------------------------------------------------

function notify(text) {
  const notice = document.createElement("div");
  notice.className = "notice";
  notice.setAttribute("role", "alert");
  const p = document.createElement("p");
  p.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.setAttribute("aria-label", "Dismiss");
  close.textContent = "×";
  close.addEventListener("click", () => notice.remove());
  notice.append(p, close);
  ui.notices.append(notice);
  // Keep at most three on screen.
  while (ui.notices.children.length > 3) ui.notices.firstElementChild.remove();
  setTimeout(() => notice.remove(), NOTICE_MS);
}

// ---- start ---------------------------------------------------------------

ui.jump.addEventListener("click", scrollToBottom);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) {
    unread = 0;
    document.title = TITLE;
  }
});
ui.scroller.addEventListener("scroll", () => {
  stuck = atBottom();
  if (stuck) ui.jump.hidden = true;
});
// A smaller window, a growing message box or a rotated phone must not
// unstick the view.
new ResizeObserver(() => {
  if (stuck) ui.scroller.scrollTop = ui.scroller.scrollHeight;
}).observe(ui.scroller);
ui.retry.addEventListener("click", () => {
  attempts = 0;
  connect();
});
// Back online or back to the tab: do not wait out a long backoff.
window.addEventListener("online", () => {
  if (!socket) connect();
});
setInterval(refreshTimes, 30000);
updateComposer();
connect();
