// TLS, mutual TLS and bearer tokens against the real binary. The
// certificates are throwaway ones made by clients/scripts/test-certs.sh (the
// openssl CLI): a test CA, a server certificate for localhost / 127.0.0.1 and
// a client certificate, all signed by it.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { Backstop, ControlPlaneError, ControlPlaneUnavailable, Unauthenticated } from '@backstop/client';
import { BackstopServer } from '@backstop/client/testing';
import { ROOT, backstopBin, recordingLogger } from './helpers.mjs';

const TOKEN = 'fleet-token-0123456789';
let dir;
const pem = (name) => readFileSync(join(dir, name));

let haveOpenssl = true;
try {
  execFileSync('openssl', ['version'], { stdio: 'ignore' });
} catch {
  haveOpenssl = false;
}

before(() => {
  if (!haveOpenssl) return;
  dir = mkdtempSync(join(tmpdir(), 'backstop-certs-'));
  execFileSync(join(ROOT, 'clients/scripts/test-certs.sh'), [dir], { stdio: 'ignore' });
});
after(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const tlsConfig = (extra = '') => `
[server.tls]
cert = "${dir}/server.pem"
key = "${dir}/server.key"
client_ca = "${dir}/ca.pem"
require_client_cert = true
${extra}
[targets.a]
`;

const AUTH = () => `
[[auth.principals]]
name = "fleet"
roles = ["agent"]
token_sha256 = "${createHash('sha256').update(TOKEN).digest('hex')}"

[routes.chat]
targets = ["a"]
[targets.a]
`;

async function withServer(config, fn) {
  const server = await BackstopServer.start(config, { binary: backstopBin() });
  const clients = [];
  const make = (opts = {}) => {
    const c = new Backstop(server.address, { timeoutMs: 1000, queueTimeoutMs: 2000, connectTimeoutMs: 500, caller: 'tls', logger: recordingLogger(), ...opts });
    clients.push(c);
    return c;
  };
  try {
    await fn(make, server);
  } finally {
    for (const c of clients) c.close();
    await server.close();
  }
}

const opts = { skip: !haveOpenssl && 'needs the openssl CLI' };

test('mutual TLS: the right roots and client certificate are served', opts, async () => {
  await withServer(tlsConfig(), async (make) => {
    const bs = make({ tls: { rootCerts: pem('ca.pem'), certChain: pem('client.pem'), privateKey: pem('client.key') } });
    const adm = await bs.canProceed('a');
    assert.equal(adm.allowed, true);
    assert.equal(adm.local, false);
    assert.equal(await bs.call(['a'], ({ target }) => `ok from ${target}`), 'ok from a');
    assert.ok(Array.isArray(await bs.queueStats()));
    assert.equal(bs.mode, 'remote');
  });
});

test('mutual TLS: no client certificate, a foreign CA, or plaintext are refused', opts, async () => {
  await withServer(tlsConfig(), async (make) => {
    const noCert = make({ tls: { rootCerts: pem('ca.pem') } });
    await assert.rejects(noCert.queueStats(), (e) => {
      assert.ok(e instanceof ControlPlaneUnavailable, String(e));
      assert.ok(e.details, String(e));
      return true;
    });
    // Decisions go to the local fail-safe, as for any unreachable server.
    assert.equal((await noCert.canProceed('a')).local, true);

    const foreign = make({ tls: { rootCerts: pem('other-ca.pem'), certChain: pem('client.pem'), privateKey: pem('client.key') } });
    await assert.rejects(foreign.queueStats(), ControlPlaneUnavailable);

    const plain = make();
    await assert.rejects(plain.queueStats(), ControlPlaneUnavailable);
  });
});

for (const stream of [true, false]) {
  test(`token (${stream ? 'Decide stream' : 'unary'}): the right one is served, a wrong or missing one is Unauthenticated`, opts, async () => {
    await withServer(AUTH(), async (make) => {
      const good = make({ token: TOKEN, stream });
      const adm = await good.canProceed('a');
      assert.equal(adm.allowed, true);
      assert.equal(adm.local, false);
      assert.equal(await good.call('chat', () => 'ok'), 'ok');
      assert.ok((await good.defer('chat', { p: 1 })).id);

      for (const bad of [make({ token: 'wrong-token-0000000000', stream }), make({ stream })]) {
        await assert.rejects(bad.canProceed('a'), (e) => {
          assert.ok(e instanceof Unauthenticated, String(e));
          assert.ok(e instanceof ControlPlaneError);
          assert.equal(e.code, 16);
          return true;
        });
        await assert.rejects(bad.call('chat', () => 'never called'), Unauthenticated);
        await assert.rejects(bad.defer('chat', { p: 1 }), Unauthenticated);
        assert.equal(bad.mode, 'remote', 'a refused token is not an outage');
      }
    });
  });
}

test('token over TLS', opts, async () => {
  await withServer(`
[server.tls]
cert = "${dir}/server.pem"
key = "${dir}/server.key"
${AUTH()}`, async (make) => {
    const tls = { rootCerts: pem('ca.pem'), serverName: 'localhost' };
    assert.equal((await make({ tls, token: TOKEN }).canProceed('a')).allowed, true);
    await assert.rejects(make({ tls, token: 'wrong-token-0000000000' }).canProceed('a'), Unauthenticated);
  });
});
