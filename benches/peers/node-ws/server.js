// A minimal, straightforward Node.js server for the chat protocol, on the
// `ws` package: the kind of server people write first. It exists only to
// give the benchmarks a side-by-side peer; it is not part of the product.
// The protocol's rules are in ../chat.js, shared with the Bun peer.
//
// PORT (default 8081), HISTORY_LIMIT (10000), MESSAGE_RATE (60 per minute).
'use strict';
const { WebSocketServer } = require('ws');
const { handle, historyFrames } = require('../chat.js');

const PORT = Number(process.env.PORT || 8081);

const wss = new WebSocketServer({ host: '127.0.0.1', port: PORT, path: '/ws', maxPayload: 16 * 1024 });

wss.on('connection', (ws, req) => {
  const ip = req.socket.remoteAddress;
  for (const frame of historyFrames()) ws.send(frame);
  ws.on('message', (data, isBinary) => {
    const out = handle(ip, isBinary ? null : data.toString());
    if (out.reply) return ws.send(out.reply);
    for (const client of wss.clients) {
      if (client.readyState === 1) client.send(out.broadcast);
    }
  });
});

wss.on('listening', () => console.log(`node-ws peer listening on ws://127.0.0.1:${PORT}/ws`));
