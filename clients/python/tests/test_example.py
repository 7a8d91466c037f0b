"""The agent_fleet example runs end to end (a shortened run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_fleet.py"


def test_agent_fleet_demo(backstop_bin: str) -> None:
    env = dict(os.environ, BACKSTOP_BIN=backstop_bin)
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), "--workers", "2", "--duration", "5"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    m = re.search(r"served by a fallback model: (\d+)", text)
    assert m and int(m.group(1)) > 0, text
    m = re.search(r"deferred while every model was down: (\d+); drained after recovery: (\d+)", text)
    assert m and int(m.group(1)) > 0 and m.group(1) == m.group(2), text
    assert "failed outright: 0" in text
