#!/usr/bin/env node
// An agent written with MQTT.js (npm package `mqtt`): connects to a wss:// (or mqtts://)
// URL with a client certificate or a token, subscribes, and exits 0 after --count
// messages. Prints the same event lines as the paho scripts (see ../fcmqtt.py):
//   connack reason_code=0 | suback codes=1 | message topic=... payload=... | error message=...
// Exit codes: 0 done, 1 could not connect, 2 connection lost, 3 timed out.
'use strict';

const fs = require('fs');
const mqtt = require('mqtt');

function parseArgs(argv) {
  const a = { filter: [], count: 0, protocol: 5, timeout: 20 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    const value = argv[i + 1];
    if (key === 'filter') a.filter.push(value);
    else if (['count', 'protocol', 'timeout'].includes(key)) a[key] = Number(value);
    else a[key.replace(/-([a-z])/g, (_m, c) => c.toUpperCase())] = value;
  }
  return a;
}

function emit(event, fields) {
  const parts = [event];
  for (const [k, v] of Object.entries(fields)) parts.push(`${k}=${encodeURIComponent(String(v))}`);
  process.stdout.write(parts.join(' ') + '\n');
}

const a = parseArgs(process.argv.slice(2));
const opts = {
  clientId: a.clientId,
  protocolVersion: a.protocol,
  clean: true,
  reconnectPeriod: 0,
  connectTimeout: 10000,
  rejectUnauthorized: true,
};
if (a.ca) opts.ca = fs.readFileSync(a.ca);
if (a.cert) opts.cert = fs.readFileSync(a.cert);
if (a.key) opts.key = fs.readFileSync(a.key);
if (a.username !== undefined) opts.username = a.username;
if (a.password !== undefined) opts.password = a.password;

let received = 0;
let done = false;
const client = mqtt.connect(a.url, opts);
const timer = setTimeout(() => {
  emit('error', { message: `timed out after ${received} of ${a.count} messages` });
  process.exit(3);
}, a.timeout * 1000);

client.on('connect', (connack) => {
  emit('connack', { reason_code: connack.reasonCode || connack.returnCode || 0 });
  if (a.filter.length === 0) return;
  client.subscribe(a.filter, { qos: 1 }, (err, granted) => {
    if (err) {
      emit('error', { message: `subscribe failed: ${err.message}` });
      process.exit(2);
    }
    emit('suback', { codes: granted.map((g) => g.qos).join(',') });
  });
});
client.on('message', (topic, payload, packet) => {
  received += 1;
  emit('message', { topic, qos: packet.qos, retain: packet.retain ? 1 : 0, payload: payload.toString() });
  if (a.count && received >= a.count && !done) {
    done = true;
    clearTimeout(timer);
    // After this handler returns MQTT.js acknowledges the message; then disconnect.
    setImmediate(() => client.end(false, () => process.exit(0)));
  }
});
client.on('error', (err) => {
  if (done) return;
  emit('error', { message: `${err.code || ''} ${err.message}` });
  process.exit(1);
});
client.on('close', () => {
  if (done) return;
  if (!a.count || received < a.count) {
    emit('disconnected', { after: received });
    process.exit(2);
  }
});
