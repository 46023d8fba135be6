// The chat protocol's rules as the benchmark peers implement them, written
// once for both (Node.js `ws` and Bun): what a straightforward server does
// with each frame. Only the transport differs between the peers.
//
// HISTORY_LIMIT (10000), MESSAGE_RATE (60 per minute) from the environment.
'use strict';

const HISTORY_LIMIT = Number(process.env.HISTORY_LIMIT || 10000);
const MESSAGE_RATE = Number(process.env.MESSAGE_RATE || 60);
const WINDOW_MS = 60000;

const history = [];
const byId = new Map();
const sent = new Map(); // ip -> timestamps of accepted messages

function allowed(ip, now) {
  const times = (sent.get(ip) || []).filter((t) => now - t < WINDOW_MS);
  sent.set(ip, times);
  return times.length < MESSAGE_RATE;
}

const error = (text) => ({ reply: JSON.stringify({ type: 'error', data: { error: text } }) });

/** The history as `message` frames, for a client that just connected. */
function historyFrames() {
  return history.map((m) => JSON.stringify({ type: 'message', data: m }));
}

/**
 * Handles one text frame from `ip` (`null` for a binary frame): returns
 * `{ reply }` for the sender alone, or `{ broadcast }` for everyone.
 */
function handle(ip, text) {
  let frame;
  try {
    if (text === null) throw new Error('binary');
    frame = JSON.parse(text);
  } catch (e) {
    return error('Invalid message format');
  }
  const d = frame && frame.data;
  if (frame.type === 'send_message' && d && typeof d.text === 'string') {
    if (d.text.trim() === '') return error('message text cannot be empty');
    if ([...d.text].length > 500) return error('message too long (max 500 characters)');
    const now = Date.now();
    if (!allowed(ip, now)) return error(`Rate limit exceeded. Maximum ${MESSAGE_RATE} messages per minute.`);
    sent.get(ip).push(now);
    const m = {
      id: crypto.randomUUID(),
      text: d.text,
      author_id: ip,
      author_name: (d.author_name || '').trim() || 'Anonymous',
      created_at: Math.floor(now / 1000),
      reactions: {},
    };
    history.push(m);
    byId.set(m.id, m);
    if (history.length > HISTORY_LIMIT) byId.delete(history.shift().id);
    return { broadcast: JSON.stringify({ type: 'message', data: m }) };
  }
  if (frame.type === 'add_reaction' && d && typeof d.message_id === 'string' && typeof d.emoji === 'string') {
    const m = byId.get(d.message_id);
    if (!m) return error('message not found');
    const users = m.reactions[d.emoji] || [];
    const i = users.indexOf(ip);
    let action;
    if (i >= 0) { users.splice(i, 1); action = 'removed'; } else { users.push(ip); action = 'added'; }
    if (users.length) m.reactions[d.emoji] = users; else delete m.reactions[d.emoji];
    return { broadcast: JSON.stringify({ type: 'reaction_updated', data: { message_id: m.id, emoji: d.emoji, user_id: ip, action, message: m } }) };
  }
  return error('Invalid message format');
}

module.exports = { handle, historyFrames };
