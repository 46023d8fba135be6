// The chat protocol on Bun.serve's WebSocket server (uWebSockets
// underneath), written as a user would: one topic, server.publish. It exists
// only to give the benchmarks a side-by-side peer; it is not part of the
// product. Run with the `bun` from this directory's node_modules.
//
// PORT (default 8082), HISTORY_LIMIT (10000), MESSAGE_RATE (60 per minute).
const PORT = Number(process.env.PORT || 8082);
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

const error = (ws, text) => ws.send(JSON.stringify({ type: 'error', data: { error: text } }));

const server = Bun.serve({
  hostname: '127.0.0.1',
  port: PORT,
  fetch(req, server) {
    if (new URL(req.url).pathname === '/ws' &&
        server.upgrade(req, { data: { ip: server.requestIP(req)?.address } })) {
      return;
    }
    return new Response('not found', { status: 404 });
  },
  websocket: {
    maxPayloadLength: 16 * 1024,
    open(ws) {
      for (const m of history) ws.send(JSON.stringify({ type: 'message', data: m }));
      ws.subscribe('chat');
    },
    message(ws, data) {
      const ip = ws.data.ip;
      let frame;
      try {
        if (typeof data !== 'string') throw new Error('binary');
        frame = JSON.parse(data);
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
        server.publish('chat', JSON.stringify({ type: 'message', data: m }));
      } else if (frame.type === 'add_reaction' && d && typeof d.message_id === 'string' && typeof d.emoji === 'string') {
        const m = byId.get(d.message_id);
        if (!m) return error(ws, 'message not found');
        const users = m.reactions[d.emoji] || [];
        const i = users.indexOf(ip);
        let action;
        if (i >= 0) { users.splice(i, 1); action = 'removed'; } else { users.push(ip); action = 'added'; }
        if (users.length) m.reactions[d.emoji] = users; else delete m.reactions[d.emoji];
        server.publish('chat', JSON.stringify({ type: 'reaction_updated', data: { message_id: m.id, emoji: d.emoji, user_id: ip, action, message: m } }));
      } else {
        error(ws, 'Invalid message format');
      }
    },
  },
});

console.log(`bun peer listening on ws://127.0.0.1:${server.port}/ws (Bun ${Bun.version})`);
