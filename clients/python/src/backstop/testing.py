"""Test helpers: a real Backstop server in a subprocess, and a fake LLM provider.

Used by this package's own tests and example, and meant for yours: test an
agent's resilience against the real control plane and a provider that fails
on cue, without network access or API keys.

    with BackstopServer(CONFIG) as server, FakeProvider() as provider:
        provider.script("sonnet", overloaded(), overloaded())   # the next two calls fail with 529
        bs = Backstop(server.address)
        ...

:class:`FakeProvider` speaks a tiny JSON-over-HTTP API (``POST /v1/complete``)
and fails the way real providers do: the status codes, error bodies and
rate-limit headers of Anthropic and OpenAI. Its client raises
:class:`ProviderError`, shaped like the SDKs' ``APIStatusError`` (``status_code``,
``response.headers``, ``body``), which is all ``guard()`` and ``call()`` look at.
Scripts are set over HTTP (``POST /control``), so several processes can share
one fake provider.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Deque, Dict, List, Mapping, Optional, Sequence

# --- the Backstop server ---------------------------------------------------------------


def find_binary(explicit: Optional[str] = None) -> str:
    """The ``backstop`` binary: ``explicit``, else ``$BACKSTOP_BIN``, else ``backstop`` on PATH.

    Returned as an absolute path: the server is started in its own temporary
    directory, where a relative ``target/release/backstop`` would not resolve.
    """
    for candidate in (explicit, os.environ.get("BACKSTOP_BIN"), shutil.which("backstop")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    raise FileNotFoundError(
        "cannot find the backstop binary: set BACKSTOP_BIN (e.g. target/debug/backstop after `cargo build`) "
        "or put `backstop` on PATH"
    )


_HELP_CACHE: Dict[str, str] = {}


def serve_help(binary: str) -> str:
    """``backstop serve --help`` (cached), to detect optional flags such as ``--data-dir``."""
    if binary not in _HELP_CACHE:
        out = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True, timeout=30)
        _HELP_CACHE[binary] = out.stdout + out.stderr
    return _HELP_CACHE[binary]


class BackstopServer:
    """Runs ``backstop serve`` with a TOML config on a free loopback port.

    :param config: TOML text (empty = built-in defaults).
    :param port: 0 picks a free port; :meth:`restart` reuses the one bound.
    :param host: the loopback address to listen on (another ``127.x.y.z`` lets
        several servers share a port, e.g. behind one DNS name).
    :param data_dir: passed as ``--data-dir`` when the binary supports it
        (a fresh temporary directory by default, kept across restarts).
    :param redis: a Redis URL: cluster mode (``--redis``), state shared with
        every server started with the same URL (see :class:`RedisServer`).
    """

    def __init__(
        self,
        config: str = "",
        *,
        binary: Optional[str] = None,
        port: int = 0,
        host: str = "127.0.0.1",
        data_dir: Optional[str] = None,
        redis: Optional[str] = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
    ) -> None:
        self.binary = find_binary(binary)
        self._tmp = tempfile.TemporaryDirectory(prefix="backstop-test-")
        self.dir = Path(self._tmp.name)
        self.config_path = self.dir / "backstop.toml"
        self.config_path.write_text(config)
        self.log_path = self.dir / "backstop.log"
        self.port = port
        self.host = host
        self.redis = redis
        self.data_dir = data_dir or str(self.dir / "data")
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.fields: Dict[str, str] = {}

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the gRPC listener."""
        return self.fields["grpc"]

    def metrics(self) -> str:
        """The server's ``GET /metrics`` text (it must have been started with HTTP on)."""
        http = self.fields.get("http", "off")
        if http == "off":
            raise RuntimeError("this server runs without its HTTP listener (--http off)")
        with urllib.request.urlopen(f"http://{http}/metrics", timeout=5) as r:
            text: str = r.read().decode()
        return text

    def _args(self) -> List[str]:
        args = [
            self.binary,
            "serve",
            "--config",
            str(self.config_path),
            "--listen",
            f"{self.host}:{self.port}",
        ]
        flags = serve_help(self.binary)
        if self.redis is not None:
            args += ["--redis", self.redis]
        if "--data-dir" in flags:
            args += ["--data-dir", self.data_dir]
        if "--http" in flags and not any(a.startswith("--http") for a in self.extra_args):
            # The HTTP listener has a fixed default port: two servers would collide.
            args += ["--http", f"{self.host}:0"]
        return args + self.extra_args

    def start(self) -> BackstopServer:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("already running")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self._args(), stdout=subprocess.PIPE, stderr=log, env=env, cwd=self.dir)
        found = threading.Event()
        assert self.proc.stdout is not None
        stdout = self.proc.stdout

        def read() -> None:
            for raw in stdout:
                line = raw.decode(errors="replace").strip()
                if line.startswith("backstop listening"):
                    self.fields = dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
                    found.set()
            found.set()  # EOF: the process ended

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(self.startup_timeout) or "grpc" not in self.fields:
            self.kill()
            raise RuntimeError(f"backstop did not start; its log:\n{self.logs()}")
        self.port = int(self.address.rsplit(":", 1)[1])
        return self

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM (graceful drain); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, retries: int = 50) -> BackstopServer:
        """Starts again on the same port (and data directory)."""
        self.kill()
        last: Optional[Exception] = None
        for _ in range(retries):
            try:
                return self.start()
            except RuntimeError as e:  # the port may take a moment to be free
                last = e
                time.sleep(0.1)
        raise RuntimeError(f"backstop did not restart on port {self.port}: {last}")

    def close(self) -> None:
        self.kill()
        self._tmp.cleanup()

    def __enter__(self) -> BackstopServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- Redis, for cluster mode -------------------------------------------------------------


def find_redis(explicit: Optional[str] = None) -> str:
    """``redis-server``: ``explicit``, else ``$REDIS_SERVER``, else on PATH."""
    for candidate in (explicit, os.environ.get("REDIS_SERVER"), shutil.which("redis-server")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "cannot find redis-server (needed for cluster-mode tests): install it "
        "(Debian/Ubuntu: apt-get install redis-server) or set REDIS_SERVER"
    )


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port that keeps nothing on
    disk, for :class:`BackstopServer` replicas in cluster mode::

        with RedisServer() as redis:
            a = BackstopServer(CONFIG, redis=redis.url).start()
            b = BackstopServer(CONFIG, redis=redis.url).start()
    """

    def __init__(self, *, binary: Optional[str] = None, startup_timeout: float = 10.0) -> None:
        self.binary = find_redis(binary)
        self._tmp = tempfile.TemporaryDirectory(prefix="backstop-redis-")
        self.log_path = Path(self._tmp.name) / "redis.log"
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> RedisServer:
        # redis-server cannot pick a free port itself: take one, and try another
        # if something else grabbed it in between.
        for _ in range(10):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                     "--dir", self._tmp.name],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.ping():
                    return self
                time.sleep(0.02)
            self.kill()
        raise RuntimeError(f"redis-server did not start; its log:\n{self.log_path.read_text(errors='replace')}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- the fake provider -----------------------------------------------------------------


def ok(text: Optional[str] = None, *, headers: Optional[Mapping[str, str]] = None, output_tokens: int = 12) -> Dict[str, Any]:
    """A 200 with ``text`` (default: "reply from MODEL")."""
    return {"status": 200, "text": text, "headers": dict(headers or {}), "output_tokens": output_tokens}


def reply(text: str) -> Dict[str, Any]:
    """A 200 whose content is exactly ``text`` (e.g. JSON for structured output)."""
    return ok(text)


def malformed(text: str = '{"answer": "forty-two", ') -> Dict[str, Any]:
    """A 200 whose content is not valid JSON."""
    return ok(text)


def _anthropic_error(status: int, etype: str, message: str, headers: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    return {
        "status": status,
        "body": {"type": "error", "error": {"type": etype, "message": message}},
        "headers": dict(headers or {}),
    }


def _openai_error(
    status: int, etype: str, code: Optional[str], message: str, headers: Optional[Mapping[str, str]] = None
) -> Dict[str, Any]:
    return {
        "status": status,
        "body": {"error": {"message": message, "type": etype, "param": None, "code": code}},
        "headers": dict(headers or {}),
    }


def overloaded() -> Dict[str, Any]:
    """Anthropic's 529 ``overloaded_error``."""
    return _anthropic_error(529, "overloaded_error", "Overloaded")


def server_error() -> Dict[str, Any]:
    """A 500 ``api_error``."""
    return _anthropic_error(500, "api_error", "Internal server error")


def unavailable() -> Dict[str, Any]:
    """OpenAI's 503 ``server_is_overloaded``."""
    return _openai_error(503, "server_error", "server_is_overloaded", "The server is overloaded")


def _rfc3339(seconds_from_now: float) -> str:
    t = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(seconds=seconds_from_now)
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def rate_limited_openai(retry_after: float = 1.0) -> Dict[str, Any]:
    """OpenAI's 429 with ``retry-after`` and ``x-ratelimit-*`` headers."""
    headers = {
        "retry-after": f"{retry_after:g}",
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": f"{retry_after:g}s",
        "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-tokens": "29000",
        "x-ratelimit-reset-tokens": "120ms",
    }
    return _openai_error(
        429,
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for gpt-4o in organization org-test on requests per min (RPM): Limit 500, Used 500.",
        headers,
    )


def rate_limited_anthropic(retry_after: float = 1.0) -> Dict[str, Any]:
    """Anthropic's 429 ``rate_limit_error`` with ``retry-after`` and ``anthropic-ratelimit-*`` headers."""
    headers = {
        "retry-after": f"{max(1, round(retry_after))}",
        "anthropic-ratelimit-requests-limit": "50",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": _rfc3339(retry_after),
        "anthropic-ratelimit-tokens-limit": "80000",
        "anthropic-ratelimit-tokens-remaining": "64000",
        "anthropic-ratelimit-tokens-reset": _rfc3339(retry_after),
    }
    return _anthropic_error(429, "rate_limit_error", "Number of requests has exceeded your rate limit", headers)


def insufficient_quota() -> Dict[str, Any]:
    """OpenAI's 429 ``insufficient_quota`` (a PERSISTENT failure with a rate-limit status)."""
    return _openai_error(
        429, "insufficient_quota", "insufficient_quota", "You exceeded your current quota, please check your plan."
    )


def unauthorized() -> Dict[str, Any]:
    """Anthropic's 401 ``authentication_error``."""
    return _anthropic_error(401, "authentication_error", "invalid x-api-key")


def context_length() -> Dict[str, Any]:
    """OpenAI's 400 ``context_length_exceeded``."""
    return _openai_error(
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "This model's maximum context length is 128000 tokens. However, your messages resulted in 150000 tokens.",
    )


def hang(seconds: float, then: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Waits ``seconds`` before answering (``then``, default a 200): provokes client timeouts."""
    b = dict(then or ok())
    b["hang"] = seconds
    return b


class _Response:
    """The ``response`` attribute of :class:`ProviderError` (httpx.Response-like)."""

    def __init__(self, status_code: int, headers: Dict[str, str], text: str) -> None:
        self.status_code = status_code
        self.headers = headers
        self.text = text


class ProviderError(Exception):
    """A non-2xx answer, shaped like ``anthropic.APIStatusError`` / ``openai.APIStatusError``."""

    def __init__(self, status_code: int, headers: Dict[str, str], text: str) -> None:
        self.status_code = status_code
        self.response = _Response(status_code, headers, text)
        try:
            self.body: Any = json.loads(text)
        except ValueError:
            self.body = text
        err = self.body.get("error") if isinstance(self.body, dict) else None
        self.message = err.get("message", text) if isinstance(err, dict) else text
        super().__init__(f"Error code: {status_code} - {self.message}")


class ProviderTimeout(TimeoutError):
    """The provider did not answer within the client's timeout."""


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Completion:
    """A successful answer: the text, token usage and response headers."""

    text: str
    model: str
    usage: Usage = field(default_factory=Usage)
    headers: Dict[str, str] = field(default_factory=dict)


class FakeProviderClient:
    """Talks to a :class:`FakeProvider` by URL (usable from other processes)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _post(self, path: str, payload: Any, timeout: float = 10.0) -> Any:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def script(self, model: str, *behaviours: Dict[str, Any]) -> None:
        """The next ``len(behaviours)`` calls to ``model`` answer these, in order."""
        self._post("/control", {"model": model, "script": list(behaviours)})

    def set_default(self, model: str, behaviour: Optional[Dict[str, Any]]) -> None:
        """What ``model`` answers once its script is used up (None = a normal 200): an outage."""
        self._post("/control", {"model": model, "default": behaviour})

    def reset(self) -> None:
        self._post("/control", {"reset": True})

    def stats(self) -> Dict[str, Dict[str, Any]]:
        """Per model: ``calls`` and ``statuses`` ({status: count}) so far."""
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as r:
            data: Dict[str, Dict[str, Any]] = json.loads(r.read())
            return data

    def calls(self, model: str) -> int:
        return int(self.stats().get(model, {}).get("calls", 0))

    def complete(self, model: str, prompt: str, *, max_tokens: int = 0, timeout: float = 5.0) -> Completion:
        """One completion. Raises :class:`ProviderError` on non-2xx,
        :class:`ProviderTimeout` after ``timeout``, ``ConnectionError`` when unreachable."""
        req = urllib.request.Request(
            self.url + "/v1/complete",
            data=json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens}).encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                headers = {k.lower(): v for k, v in r.headers.items()}
                data = json.loads(r.read())
        except urllib.error.HTTPError as e:
            headers = {k.lower(): v for k, v in e.headers.items()} if e.headers else {}
            raise ProviderError(e.code, headers, e.read().decode(errors="replace")) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (socket.timeout, TimeoutError)):
                raise ProviderTimeout(f"{model}: no answer within {timeout}s") from None
            raise ConnectionError(f"{model}: {e.reason}") from None
        except (socket.timeout, TimeoutError):
            raise ProviderTimeout(f"{model}: no answer within {timeout}s") from None
        u = data.get("usage", {})
        return Completion(
            text=data["content"],
            model=model,
            usage=Usage(int(u.get("input_tokens", 0)), int(u.get("output_tokens", 0))),
            headers=headers,
        )


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.scripts: Dict[str, Deque[Dict[str, Any]]] = collections.defaultdict(collections.deque)
        self.defaults: Dict[str, Optional[Dict[str, Any]]] = {}
        self.stats: Dict[str, Dict[str, Any]] = {}

    def next(self, model: str) -> Dict[str, Any]:
        with self.lock:
            s = self.stats.setdefault(model, {"calls": 0, "statuses": {}})
            s["calls"] += 1
            q = self.scripts[model]
            b = q.popleft() if q else (self.defaults.get(model) or ok())
            status = str(b.get("status", 200))
            s["statuses"][status] = s["statuses"].get(status, 0) + 1
            return b


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _json(self, status: int, payload: Any, headers: Optional[Mapping[str, str]] = None) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout we provoked)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/stats":
            with self.server.state.lock:
                self._json(200, self.server.state.stats)
        else:
            self._json(404, {"error": {"type": "not_found_error", "message": self.path}})

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("content-length", "0"))
        data = json.loads(self.rfile.read(length) or b"{}")
        st = self.server.state
        if self.path == "/control":
            with st.lock:
                if data.get("reset"):
                    st.scripts.clear()
                    st.defaults.clear()
                    st.stats.clear()
                model = data.get("model")
                if model and "script" in data:
                    st.scripts[model].extend(data["script"])
                if model and "default" in data:
                    st.defaults[model] = data["default"]
            self._json(200, {"ok": True})
            return
        if self.path != "/v1/complete":
            self._json(404, {"error": {"type": "not_found_error", "message": self.path}})
            return
        model = str(data.get("model", ""))
        b = st.next(model)
        if b.get("hang"):
            time.sleep(float(b["hang"]))
        status = int(b.get("status", 200))
        if status >= 300:
            self._json(status, b.get("body", {}), b.get("headers"))
            return
        prompt = str(data.get("prompt", ""))
        text = b.get("text")
        self._json(
            status,
            {
                "model": model,
                "content": text if text is not None else f"reply from {model}",
                "usage": {"input_tokens": len(prompt) // 4 + 1, "output_tokens": int(b.get("output_tokens", 12))},
            },
            b.get("headers"),
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class FakeProvider(FakeProviderClient):
    """A scripted fake LLM provider on a free loopback port (a thread of this process)."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = _State()
        host, port = self._server.server_address[:2]
        super().__init__(f"http://{host!s}:{port}")
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-provider", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeProvider:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
