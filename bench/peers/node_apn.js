// @parse/node-apn driver for bench/peers.py.
// argv: HOST PORT CA_FILE KEY_FILE KEY_ID TEAM_ID N [CONNECTIONS] [TOPIC]
// Sends N pushes of the same small payload to distinct tokens in chunks of 1000 (a bulk
// send of 20k at once fails on node-apn's session memory limit), after one warm-up push,
// through a MultiProvider of CONNECTIONS http2 sessions (default 2). The provider signs a
// real ES256 JWT. Prints one JSON line: {seconds, cpu, ok, failed, rss_peak_mb}.
'use strict';
const fs = require('fs');
const apn = require('@parse/node-apn');

const [host, port, caFile, keyFile, keyId, teamId, nStr, connStr, topicArg] = process.argv.slice(2);
const n = parseInt(nStr, 10);
const connections = parseInt(connStr || '2', 10);
const topic = topicArg || 'com.example.bench';
const CHUNK = 1000;
const PAYLOAD = { aps: { alert: { title: 'bench', body: 'x'.repeat(60) } } };

function note() {
  const nt = new apn.Notification();
  nt.rawPayload = PAYLOAD;
  nt.topic = topic;
  nt.pushType = 'alert';
  nt.priority = 10;
  return nt;
}

async function main() {
  const provider = new apn.MultiProvider({
    token: { key: fs.readFileSync(keyFile), keyId, teamId },
    address: host,
    port: parseInt(port, 10),
    ca: fs.readFileSync(caFile),
    rejectUnauthorized: true,
    production: true,
    clientCount: connections,
  });
  const notification = note();
  const warm = await provider.send(notification, '00'.repeat(32));
  if (warm.failed.length) throw new Error('warm-up failed: ' + JSON.stringify(warm.failed[0]));
  let ok = 0;
  let failed = 0;
  let rssPeak = process.memoryUsage().rss;
  const c0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  for (let start = 0; start < n; start += CHUNK) {
    const tokens = [];
    for (let i = start; i < Math.min(n, start + CHUNK); i++) tokens.push(i.toString(16).padStart(64, '0'));
    const res = await provider.send(notification, tokens);
    ok += res.sent.length;
    failed += res.failed.length;
    rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const c = process.cpuUsage(c0);
  await provider.shutdown();
  console.log(JSON.stringify({ seconds, cpu: (c.user + c.system) / 1e6, ok, failed,
                               rss_peak_mb: rssPeak / 2 ** 20 }));
  process.exit(0);
}

main().catch((err) => { console.error(err && err.stack || err); process.exit(1); });
