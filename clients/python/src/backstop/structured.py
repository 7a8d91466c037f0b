"""Structured output with correction prompts.

``structured(fn, schema)`` wraps a provider function so that its reply is
parsed as JSON and validated (a pydantic v2 model or a JSON-schema dict).
A reply that does not validate raises :class:`MalformedOutput`, which
``call()`` reports as PARTIAL (the server's advice is CORRECT_AND_RETRY, and
PARTIAL shows separately in the target's counters); the next call of ``fn``
receives a :class:`Correction` describing what was wrong, to append to the
conversation. After ``max_corrections`` corrections the wrapper gives up with
:class:`StructuredOutputError`.

    ticket = bs.call(
        "chat",
        structured(lambda target, max_tokens, key_slot, correction:
                       ask(target, messages + (correction.messages if correction else [])),
                   Ticket),
    )
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Dict,
    Generic,
    List,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

from .errors import MalformedOutput, StructuredOutputError

T = TypeVar("T")

_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)


@dataclass(frozen=True)
class Correction:
    """What to tell the model after a malformed reply."""

    #: The reply that failed.
    reply: str
    #: Why it failed (a JSON or validation error).
    error: str
    #: The correction prompt: the error plus the schema to follow.
    prompt: str
    #: 1 for the first correction.
    number: int

    @property
    def messages(self) -> List[Dict[str, str]]:
        """The failed reply and the correction as chat messages (OpenAI / Anthropic shape)."""
        return [
            {"role": "assistant", "content": self.reply},
            {"role": "user", "content": self.prompt},
        ]


def _strip_fences(text: str) -> str:
    m = _FENCE.match(text)
    return m.group(1) if m else text.strip()


def _as_text(reply: Any) -> str:
    if isinstance(reply, (bytes, bytearray)):
        return bytes(reply).decode("utf-8", errors="replace")
    if isinstance(reply, str):
        return reply
    for attr in ("text", "content"):
        v = getattr(reply, attr, None)
        if isinstance(v, str):
            return v
    raise TypeError(
        f"the structured() function returned {type(reply).__name__}; return the model's reply text (str)"
    )


_TYPES: Dict[str, Tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _check(value: Any, schema: Mapping[str, Any], path: str, errors: List[str]) -> None:
    """A small JSON-schema validator (type, enum, const, required, properties,
    additionalProperties, items, min/max, min/maxLength, min/maxItems, anyOf),
    used when the ``jsonschema`` package is not installed."""
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema.get("oneOf") or []
        for opt in options:
            sub: List[str] = []
            _check(value, opt, path, sub)
            if not sub:
                break
        else:
            errors.append(f"{path}: matches none of the allowed shapes")
        return
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        ok = False
        for name in types:
            py = _TYPES.get(name, ())
            if isinstance(value, bool) and name in ("integer", "number"):
                continue
            if isinstance(value, py):
                ok = True
        if not ok:
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(value).__name__}")
            return
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']!r}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: must be {schema['const']!r}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{path}.{name}: required")
        for name, v in value.items():
            if name in props:
                _check(v, props[name], f"{path}.{name}", errors)
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}.{name}: not allowed")
    if isinstance(value, list):
        if "items" in schema and isinstance(schema["items"], Mapping):
            for i, v in enumerate(value):
                _check(v, schema["items"], f"{path}[{i}]", errors)
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: above the maximum {schema['maximum']}")


class _Validator:
    """Parses and validates replies against a pydantic model or a JSON schema."""

    def __init__(self, schema: Any) -> None:
        self.schema = schema
        self.is_model = hasattr(schema, "model_validate_json") and hasattr(schema, "model_json_schema")
        if not self.is_model and not isinstance(schema, Mapping):
            raise TypeError("schema must be a pydantic v2 model class or a JSON-schema dict")
        raw = schema.model_json_schema() if self.is_model else dict(schema)
        self.schema_text = json.dumps(raw, indent=None, sort_keys=True)

    def parse(self, text: str) -> Any:
        body = _strip_fences(text)
        if self.is_model:
            try:
                return self.schema.model_validate_json(body)
            except ValueError as e:  # pydantic.ValidationError is a ValueError
                raise MalformedOutput(_short(str(e)), text) from e
        try:
            value = json.loads(body)
        except ValueError as e:
            raise MalformedOutput(f"not valid JSON: {e}", text) from e
        try:
            import jsonschema  # type: ignore[import-untyped]
        except ImportError:
            errors: List[str] = []
            _check(value, self.schema, "$", errors)
            if errors:
                raise MalformedOutput("; ".join(errors[:5]), text) from None
            return value
        try:
            jsonschema.validate(value, self.schema)
        except jsonschema.ValidationError as e:
            raise MalformedOutput(_short(e.message), text) from e
        return value

    def prompt(self, error: str) -> str:
        return (
            f"Your previous reply could not be used: {error}\n"
            "Reply again with only a JSON value that matches this JSON schema "
            f"(no prose, no code fences):\n{self.schema_text}"
        )


def _short(s: str, limit: int = 800) -> str:
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


Reply = Union[str, bytes, Any]
StructuredFn = Callable[[str, int, str, Optional[Correction]], Union[Reply, Awaitable[Reply]]]


class Structured(Generic[T]):
    """A provider function with reply validation and correction prompts.

    Pass it to ``call()`` (sync or async). Each ``call()`` starts a fresh
    correction sequence; the object itself holds no per-call state, so one
    instance can be shared by threads and tasks.
    """

    def __init__(self, fn: StructuredFn, schema: Any, max_corrections: int = 2) -> None:
        if max_corrections < 0:
            raise ValueError("max_corrections must be >= 0")
        self.fn = fn
        self.validator = _Validator(schema)
        self.max_corrections = max_corrections

    def session(self) -> _Session[T]:
        """A stateful callable for one ``call()``: it remembers the last failure
        so the next invocation can send the correction."""
        return _Session(self)

    def __call__(self, target: str, max_tokens: int, key_slot: str) -> Any:
        """Single use outside ``call()``: one attempt, no corrections."""
        return _Session(self)(target, max_tokens, key_slot)


class _Session(Generic[T]):
    def __init__(self, owner: Structured[T]) -> None:
        self.owner = owner
        self.pending: Optional[Correction] = None
        self.errors: List[str] = []
        self.corrections = 0
        self._lock = threading.Lock()

    def _check(self, reply: Any) -> Any:
        text = _as_text(reply)
        try:
            return self.owner.validator.parse(text)
        except MalformedOutput as e:
            with self._lock:
                self.errors.append(str(e))
                if self.corrections >= self.owner.max_corrections:
                    raise StructuredOutputError(text, self.errors, self.corrections) from e
                self.corrections += 1
                self.pending = Correction(
                    reply=text, error=str(e), prompt=self.owner.validator.prompt(str(e)), number=self.corrections
                )
            raise

    def __call__(self, target: str, max_tokens: int, key_slot: str) -> Any:
        result = self.owner.fn(target, max_tokens, key_slot, self.pending)
        if inspect.isawaitable(result):

            async def finish() -> Any:
                return self._check(await result)

            return finish()
        return self._check(result)


def structured(fn: StructuredFn, schema: Any, max_corrections: int = 2) -> Structured[Any]:
    """Wraps ``fn(target, max_tokens, key_slot, correction)`` -> reply text so that
    ``call()`` returns the validated value (a model instance, or the parsed JSON
    for a JSON-schema dict), sending up to ``max_corrections`` correction prompts.
    ``correction`` is None on the first try."""
    return Structured(fn, schema, max_corrections)
