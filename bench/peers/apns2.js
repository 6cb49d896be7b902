// apns2 (npm, on undici) driver for bench/peers.py.
// argv: HOST PORT CA_FILE KEY_FILE KEY_ID TEAM_ID N [CONNECTIONS] [TOPIC]
// apns2 builds its own undici Pool to https://HOST:443 (32 connections, one request in
// flight each, allowH2); to reach a local sink we replace it by a Pool with the very same
// options, pointed at HOST:PORT and trusting the test CA (the custom dispatcher). So
// CONNECTIONS is not used: apns2's nearest equivalent is its fixed pool. Sends N pushes
// in chunks of 1000 after a warm-up push; the client signs a real ES256 JWT.
// Prints one JSON line: {seconds, cpu, ok, failed, rss_peak_mb}.
'use strict';
const fs = require('fs');
const { Pool } = require('undici');
const { ApnsClient, Notification } = require('apns2');

const [host, port, caFile, keyFile, keyId, teamId, nStr, , topicArg] = process.argv.slice(2);
const n = parseInt(nStr, 10);
const topic = topicArg || 'com.example.bench';
const CHUNK = 1000;
const APS = { alert: { title: 'bench', body: 'x'.repeat(60) } };

async function main() {
  const client = new ApnsClient({
    team: teamId, keyId, signingKey: fs.readFileSync(keyFile), defaultTopic: topic,
    host, keepAlive: true,
  });
  await client.client.close();
  client.client = new Pool(`https://${host}:${port}`, {
    connections: 32, pipelining: 1, allowH2: true, maxConcurrentStreams: 100,
    connect: { ca: fs.readFileSync(caFile), rejectUnauthorized: true },
  });
  await client.send(new Notification('00'.repeat(32), { aps: APS }));
  let ok = 0;
  let failed = 0;
  let rssPeak = process.memoryUsage().rss;
  const c0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  for (let start = 0; start < n; start += CHUNK) {
    const notes = [];
    for (let i = start; i < Math.min(n, start + CHUNK); i++) {
      notes.push(new Notification(i.toString(16).padStart(64, '0'), { aps: APS }));
    }
    const res = await client.sendMany(notes);
    for (const r of res) { if (r && r.error) failed++; else ok++; }
    rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const c = process.cpuUsage(c0);
  await client.close();
  console.log(JSON.stringify({ seconds, cpu: (c.user + c.system) / 1e6, ok, failed,
                               rss_peak_mb: rssPeak / 2 ** 20 }));
  process.exit(0);
}

main().catch((err) => { console.error(err && err.stack || err); process.exit(1); });
