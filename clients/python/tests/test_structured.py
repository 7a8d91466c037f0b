"""structured(): correction prompts for malformed structured output, reported as PARTIAL."""

from __future__ import annotations

import asyncio
import json
from typing import Any, List, Optional

import pytest
from pydantic import BaseModel

from backstop import (
    AsyncBackstop,
    Backstop,
    Correction,
    StructuredOutputError,
    structured,
)
from backstop.testing import BackstopServer, FakeProvider, malformed, reply

SONNET, GPT = "anthropic/sonnet", "openai/gpt-4o"


class Ticket(BaseModel):
    title: str
    priority: int


class Asker:
    """A provider function that builds the conversation the way an agent would."""

    def __init__(self, provider: FakeProvider) -> None:
        self.provider = provider
        self.corrections: List[Optional[Correction]] = []
        self.prompts: List[str] = []

    def __call__(self, target: str, max_tokens: int, key_slot: str, correction: Optional[Correction]) -> str:
        self.corrections.append(correction)
        messages = [{"role": "user", "content": "File a ticket for the outage."}]
        if correction is not None:
            messages += correction.messages
        prompt = json.dumps(messages)
        self.prompts.append(prompt)
        return self.provider.complete(target, prompt, timeout=2).text


def test_corrects_a_malformed_reply(bs: Backstop, provider: FakeProvider) -> None:
    provider.script(SONNET, malformed('{"title": "outage", "priority": '), reply('```json\n{"title": "outage", "priority": 1}\n```'))
    ask = Asker(provider)
    ticket = bs.call("chat", structured(ask, Ticket))
    assert ticket == Ticket(title="outage", priority=1)
    first, second = ask.corrections
    assert first is None
    assert second is not None and second.number == 1
    assert second.reply == '{"title": "outage", "priority": '
    assert "Invalid JSON" in second.error or "EOF" in second.error
    assert '"priority"' in second.prompt and "JSON schema" in second.prompt
    assert second.messages[0] == {"role": "assistant", "content": second.reply}
    assert json.loads(ask.prompts[1])[-1] == {"role": "user", "content": second.prompt}
    counters = bs.get_target(SONNET).counters
    assert (counters.partial, counters.success) == (1, 1)
    assert provider.calls(GPT) == 0, "a correction retries the same model"


def test_gives_up_after_max_corrections(bs: Backstop, provider: FakeProvider) -> None:
    provider.set_default(SONNET, reply('{"title": "outage", "priority": "high"}'))  # wrong type, every time
    ask = Asker(provider)
    with pytest.raises(StructuredOutputError) as gave_up:
        bs.call("chat", structured(ask, Ticket, max_corrections=2))
    err = gave_up.value
    assert err.corrections == 2 and len(err.errors) == 3
    assert "priority" in err.errors[-1]
    assert err.reply == '{"title": "outage", "priority": "high"}'
    assert [c.number if c else 0 for c in ask.corrections] == [0, 1, 2]
    assert bs.get_target(SONNET).counters.partial == 3
    assert provider.calls(GPT) == 0, "giving up does not fall back: the corrections would only repeat"


def test_json_schema_dict(bs: Backstop, provider: FakeProvider) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}, "unit": {"type": "string", "enum": ["s", "ms"]}},
        "required": ["answer", "unit"],
        "additionalProperties": False,
    }
    provider.script(SONNET, reply('{"answer": 42}'), reply('{"answer": 42, "unit": "ms"}'))
    ask = Asker(provider)
    assert bs.call("chat", structured(ask, schema)) == {"answer": 42, "unit": "ms"}
    correction = ask.corrections[1]
    assert correction is not None and "unit" in correction.error and "required" in correction.error
    assert bs.get_target(SONNET).counters.partial == 1


def test_zero_corrections(bs: Backstop, provider: FakeProvider) -> None:
    provider.script(SONNET, malformed())
    with pytest.raises(StructuredOutputError):
        bs.call("chat", structured(Asker(provider), Ticket, max_corrections=0))
    assert provider.calls(SONNET) == 1


def test_async_structured(server: BackstopServer, provider: FakeProvider) -> None:
    provider.script(SONNET, malformed(), reply('{"title": "t", "priority": 3}'))

    async def main() -> Any:
        async with AsyncBackstop(server.address, timeout=1.0) as abs_:
            async def ask(target: str, max_tokens: int, key_slot: str, correction: Optional[Correction]) -> str:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(None, lambda: provider.complete(target, "x", timeout=2).text)

            result = await abs_.call("chat", structured(ask, Ticket))
            status = await abs_.get_target(SONNET)
            return result, status.counters.partial

    result, partial = asyncio.run(main())
    assert result == Ticket(title="t", priority=3) and partial == 1
