// Node.js HTTPS peers for tests/ebpf/test_membio.py.  Node's TLS runs OpenSSL
// (statically linked into the node binary) over memory BIOs: libuv moves the
// ciphertext on the socket, not OpenSSL.
//
//   node node_https.js client PORT PATH COUNT
//       prints "started", waits for a line on stdin (the test waits until the agent
//       has probed this process), then makes COUNT sequential https.get requests
//       (one connection each, agent: false); prints one JSON line:
//       [{"local_port", "status", "body_b64"}, ...]
//   node node_https.js server CERT KEY BODY_SIZE
//       https.createServer on 127.0.0.1: prints "ready PORT", answers every request
//       with 200 and BODY_SIZE random bytes; on a line on stdin it prints one JSON
//       line [{"remote_port", "body_b64"}, ...] and exits.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const https = require('https');

function client(port, path, count) {
  const results = [];
  const one = (i) => {
    if (i === count) {
      console.log(JSON.stringify(results));
      return;
    }
    const req = https.get(
      { host: '127.0.0.1', port, path: `${path}${i}`, rejectUnauthorized: false, agent: false },
      (res) => {
        const body = [];
        res.on('data', (c) => body.push(c));
        res.on('end', () => {
          results.push({
            local_port: req.socket.localPort,
            status: res.statusCode,
            body_b64: Buffer.concat(body).toString('base64'),
          });
          one(i + 1);
        });
      },
    );
    req.on('error', (e) => { console.error(e); process.exit(1); });
  };
  one(0);
}

function server(cert, key, bodySize) {
  const served = [];
  const srv = https.createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) },
    (req, res) => {
      const body = crypto.randomBytes(bodySize);
      served.push({ remote_port: req.socket.remotePort, body_b64: body.toString('base64') });
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': bodySize });
      res.end(body);
    });
  srv.listen(0, '127.0.0.1', () => console.log(`ready ${srv.address().port}`));
  process.stdin.once('data', () => {
    // stdout is a pipe, written asynchronously: exit once it is flushed.
    process.stdout.write(`${JSON.stringify(served)}\n`, () => process.exit(0));
  });
}

const [mode, ...args] = process.argv.slice(2);
if (mode === 'client') {
  console.log('started');
  process.stdin.once('data', () => {
    process.stdin.destroy(); // an open stdin would keep node from exiting at the end
    client(Number(args[0]), args[1], Number(args[2]));
  });
}
else if (mode === 'server') server(args[0], args[1], Number(args[2]));
else { console.error(`unknown mode ${mode}`); process.exit(2); }
