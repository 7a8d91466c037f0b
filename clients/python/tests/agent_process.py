"""A stand-alone agent process for the cross-process tests (not a test module).

    python agent_process.py ADDRESS PROVIDER_URL guard TARGET N   # N guarded calls to TARGET
    python agent_process.py ADDRESS PROVIDER_URL call ROUTE N     # N call()s on ROUTE

Prints one JSON object per call: what happened, as this process saw it.
"""

from __future__ import annotations

import json
import os
import sys

from backstop import AllTargetsFailed, Backstop, Refused
from backstop.testing import FakeProviderClient, ProviderError


def main() -> None:
    address, url, mode, name, n = sys.argv[1:6]
    provider = FakeProviderClient(url)
    with Backstop(address, timeout=2.0, caller=f"agent-{os.getpid()}") as bs:
        for _ in range(int(n)):
            if mode == "guard":
                try:
                    with bs.guard(name) as g:
                        provider.complete(name, "hello", timeout=2)
                    print(json.dumps({"ok": True, "state": g.outcome.state.value if g.outcome else None}))
                except ProviderError as e:
                    print(json.dumps({"ok": False, "status": e.status_code, "state": g.outcome.state.value if g.outcome else None}))
                except Refused as e:
                    print(json.dumps({"ok": False, "refused": e.reason.value}))
            else:
                try:
                    reply = bs.call(name, lambda t, m, k: provider.complete(t, "hello", timeout=2))
                    print(json.dumps({"ok": True, "model": reply.model, "mode": bs.mode}))
                except AllTargetsFailed as e:
                    print(json.dumps({"ok": False, "error": str(e)}))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
