// The chat protocol on Bun.serve's WebSocket server (uWebSockets
// underneath), written as a user would: one topic, server.publish. It exists
// only to give the benchmarks a side-by-side peer; it is not part of the
// product. The protocol's rules are in ../chat.js, shared with the Node.js
// peer. Run with the `bun` from this directory's node_modules.
//
// PORT (default 8082), HISTORY_LIMIT (10000), MESSAGE_RATE (60 per minute).
const { handle, historyFrames } = require('../chat.js');

const PORT = Number(process.env.PORT || 8082);

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
      for (const frame of historyFrames()) ws.send(frame);
      ws.subscribe('chat');
    },
    message(ws, data) {
      const out = handle(ws.data.ip, typeof data === 'string' ? data : null);
      if (out.reply) return ws.send(out.reply);
      server.publish('chat', out.broadcast);
    },
  },
});

console.log(`bun peer listening on ws://127.0.0.1:${server.port}/ws (Bun ${Bun.version})`);
