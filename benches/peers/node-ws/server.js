// A minimal, straightforward Node.js server for the chat protocol, on the
// `ws` package: the kind of server people write first. It exists only to
// give the benchmarks a side-by-side peer; it is not part of the product.
//
// PORT (default 8081), HISTORY_LIMIT (10000), MESSAGE_RATE (60 per minute).
'use strict';
const { WebSocketServer } = require('ws');
const crypto = require('crypto');

const PORT = Number(process.env.PORT || 8081);
const HISTORY_LIMIT = Number(process.env.HISTORY_LIMIT || 10000);
const MESSAGE_RATE = Number(process.env.MESSAGE_RATE || 60);
const WINDOW_MS = 60000;

const history = [];
const byId = new Map();
const sent = new Map(); // ip -> timestamps of accepted messages

const wss = new WebSocketServer({ host: '127.0.0.1', port: PORT, path: '/ws', maxPayload: 16 * 1024 });

function broadcast(frame) {
  const text = JSON.stringify(frame);
  for (const client of wss.clients) {
    if (client.readyState === 1) client.send(text);
  }
}

function error(ws, text) {
  ws.send(JSON.stringify({ type: 'error', data: { error: text } }));
}

function allowed(ip, now) {
  const times = (sent.get(ip) || []).filter((t) => now - t < WINDOW_MS);
  sent.set(ip, times);
  return times.length < MESSAGE_RATE;
}

wss.on('connection', (ws, req) => {
  const ip = req.socket.remoteAddress;
  for (const m of history) ws.send(JSON.stringify({ type: 'message', data: m }));
  ws.on('message', (data, isBinary) => {
    let frame;
    try {
      if (isBinary) throw new Error('binary');
      frame = JSON.parse(data.toString());
    } catch (e) {
      return error(ws, 'Invalid message format');
    }
    const d = frame && frame.data;
    if (frame.type === 'send_message' && d && typeof d.text === 'string') {
      if (d.text.trim() === '') return error(ws, 'message text cannot be empty');
      if ([...d.text].length > 500) return error(ws, 'message too long (max 500 characters)');
      const now = Date.now();
      if (!allowed(ip, now)) return error(ws, `Rate limit exceeded. Maximum ${MESSAGE_RATE} messages per minute.`);
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
      broadcast({ type: 'message', data: m });
    } else if (frame.type === 'add_reaction' && d && typeof d.message_id === 'string' && typeof d.emoji === 'string') {
      const m = byId.get(d.message_id);
      if (!m) return error(ws, 'message not found');
      const users = m.reactions[d.emoji] || [];
      const i = users.indexOf(ip);
      let action;
      if (i >= 0) { users.splice(i, 1); action = 'removed'; } else { users.push(ip); action = 'added'; }
      if (users.length) m.reactions[d.emoji] = users; else delete m.reactions[d.emoji];
      broadcast({ type: 'reaction_updated', data: { message_id: m.id, emoji: d.emoji, user_id: ip, action, message: m } });
    } else {
      error(ws, 'Invalid message format');
    }
  });
});

wss.on('listening', () => console.log(`node-ws peer listening on ws://127.0.0.1:${PORT}/ws`));
