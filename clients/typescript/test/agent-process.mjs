// One agent process for the shared-breaker test: runs `count` guarded calls on
// `target` whose provider fails (mode "fail", a 529) or succeeds ("ok"), and
// prints one JSON line per call: what happened and whether the provider ran.
import { Backstop, Refused } from '@backstop/client';
import { overloaded } from '@backstop/client/testing';

const [address, mode, target, count] = process.argv.slice(2);
const bs = new Backstop(address, { timeoutMs: 1000, caller: `agent-${process.pid}` });
for (let i = 0; i < Number(count); i++) {
  let called = false;
  try {
    await bs.guard(target, () => {
      called = true;
      if (mode === 'fail') throw overloaded();
      return { text: 'ok' };
    });
    console.log(JSON.stringify({ ok: true, called }));
  } catch (e) {
    console.log(JSON.stringify({ ok: false, called, error: e.constructor.name, reason: e instanceof Refused ? e.reason : undefined, retryAfterMs: e.retryAfterMs, mode: bs.mode }));
  }
}
bs.close();
