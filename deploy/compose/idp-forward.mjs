// TCP forwarder for the compose demo: 0.0.0.0:LISTEN_PORT -> 127.0.0.1:TARGET_PORT.
//
// The test identity provider (tests/idp/server.mjs) binds 127.0.0.1 only and names itself
// http://127.0.0.1:<port> as issuer. Inside its container that loopback address is unreachable from the
// other containers and from published ports, so this forwarder exposes it on the compose network
// (idp:8081) and to the host (127.0.0.1:8080). Tokens keep the issuer http://127.0.0.1:8080, which is
// what deploy/compose/portcullis.yaml expects.
//
// Usage: node idp-forward.mjs [LISTEN_PORT] [TARGET_PORT]   (defaults 8081 8080)
import * as net from 'node:net';

const listenPort = Number(process.argv[2] ?? 8081);
const targetPort = Number(process.argv[3] ?? 8080);

const server = net.createServer((client) => {
  const upstream = net.connect(targetPort, '127.0.0.1');
  client.pipe(upstream).pipe(client);
  const close = () => {
    client.destroy();
    upstream.destroy();
  };
  client.on('error', close);
  upstream.on('error', close);
});

server.listen(listenPort, '0.0.0.0', () => {
  process.stdout.write(`idp-forward 0.0.0.0:${listenPort} -> 127.0.0.1:${targetPort}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
