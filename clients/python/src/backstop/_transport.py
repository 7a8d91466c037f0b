"""gRPC plumbing shared by the sync and the asyncio client: addresses,
channels, the generated stubs, the replicas of a cluster, the health probe,
and what an RPC error means.

Both clients (and the workers) import this module and nothing of each other,
so neither client can be pulled in by loading the other.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Generic, List, Optional, Sequence, Tuple, TypeVar, Union

import grpc
import grpc.aio

from ._proto import admin_pb2_grpc, deferred_pb2_grpc, events_pb2_grpc, resilience_pb2_grpc
from .errors import ControlPlaneError, ControlPlaneUnavailable, control_plane_error

log = logging.getLogger("backstop")

#: gRPC codes that mean "Backstop cannot answer right now" (as opposed to "Backstop said no").
OUTAGE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

HEALTH_METHOD = "/grpc.health.v1.Health/Check"
_HEALTH_SERVICE = "backstop.v1.Resilience"
#: A HealthCheckResponse saying SERVING (field 1 = enum 1).
SERVING = b"\x08\x01"


def health_request() -> bytes:
    """``grpc.health.v1.HealthCheckRequest{service: "backstop.v1.Resilience"}``, hand-encoded
    (one length-delimited field) so the client needs no health-checking package."""
    name = _HEALTH_SERVICE.encode()
    return b"\x0a" + bytes([len(name)]) + name


def health_serving(response: bytes) -> bool:
    """True when a HealthCheckResponse says SERVING."""
    return response == SERVING


def rpc_error(method: str, e: grpc.RpcError) -> ControlPlaneError:
    """The package's exception for a failed RPC: :class:`ControlPlaneUnavailable`
    for an outage (the fail-safe's cue), :class:`ControlPlaneError` otherwise."""
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    return control_plane_error(code, details or "", method, OUTAGE_CODES)


#: What ``Backstop(address)`` accepts: one address, a comma-separated list, or a list.
AddressArg = Union[str, Sequence[str]]

#: gRPC target-URI schemes. An address that starts with one goes to gRPC as it
#: is, commas included: ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` is gRPC's own
#: list syntax, and ``dns:///backstop.internal:50051`` its DNS resolver.
_URI_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds"})


def _is_uri(address: str) -> bool:
    scheme, sep, rest = address.partition(":")
    # "dns:50051" (or "dns:50051,b:50051") is the host "dns" on port 50051, not a URI.
    return bool(sep) and scheme.lower() in _URI_SCHEMES and not rest.split(",", 1)[0].strip().isdigit()


def parse_addresses(address: AddressArg) -> Tuple[str, ...]:
    """The replicas an ``address`` argument names, in order.

    ``"host:port"`` is one replica; ``"a:50051, b:50051"`` and
    ``["a:50051", "b:50051"]`` are two. A gRPC target URI (``dns:///name:port``,
    ``ipv4:...``) is one entry however many servers it resolves to. Raises
    ValueError / TypeError naming the offending entry.
    """
    if isinstance(address, str):
        text = address.strip()
        items = [text] if _is_uri(text) else text.split(",")
    elif isinstance(address, (bytes, bytearray)):
        raise TypeError("address must be a str (\"host:port\") or a list of them, not bytes")
    else:
        try:
            items = list(address)
        except TypeError:
            raise TypeError(
                f"address must be \"host:port\", a comma-separated list of them, or a list; got {type(address).__name__}"
            ) from None
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"every address in the list must be a str, got {item!r}")
            if "," in item and not _is_uri(item.strip()):
                raise ValueError(f"one address per list item: split {item!r} into separate items")
    out: List[str] = []
    for item in items:
        entry = item.strip()
        if not entry:
            raise ValueError(f"empty address in {address!r}: expected host:port entries separated by commas")
        if entry in out:
            raise ValueError(f"{entry!r} is listed twice in {address!r}")
        out.append(entry)
    if not out:
        raise ValueError("no address given: pass \"host:port\" or a list of them")
    return tuple(out)


def single_server(target: str) -> bool:
    """True when ``target`` is an IP literal and a port: it can only ever reach one
    server. (A name may resolve to several, e.g. a Kubernetes headless Service.)"""
    if _is_uri(target):
        return False
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return False
    try:
        ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
    except ValueError:
        return False
    return True


#: gRPC's own retry for the decision and admin calls on a name that resolves to
#: several servers: a call that fails UNAVAILABLE (say its server was just
#: killed) is sent again, within the same deadline, to the next server
#: round_robin picks. CanProceed / Route answers lost with their server are
#: asked again (at worst a budget unit or probe slot stays reserved until its
#: lease runs out); RecordOutcome settles once, so resending it is safe.
#: Deferred-queue calls are not retried (a Defer must not be saved twice).
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "backstop.v1.Resilience"}, {"service": "backstop.v1.Admin"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.005s",
                    "maxBackoff": "0.02s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def target_options(target: str, options: Sequence[Tuple[str, Any]], *, sticky: bool) -> List[Tuple[str, Any]]:
    """Channel options for one address: ``options`` (the client's, which win),
    plus, for a name that may resolve to several servers, the load-balancing
    policy and the retry above. ``sticky`` channels (the deferred queue's) use
    ``pick_first``: one server for as long as it is up, so a Claim and its Ack
    reach the replica that holds the item."""
    chosen: Dict[str, Any] = {}
    if not single_server(target):
        chosen["grpc.lb_policy_name"] = "pick_first" if sticky else "round_robin"
        if not sticky:
            chosen["grpc.service_config"] = _SERVICE_CONFIG
    out = list(options)
    given = {k for k, _ in out}
    out += [(k, v) for k, v in chosen.items() if k not in given]
    return out


PemArg = Union[bytes, str, "os.PathLike[str]", None]


def _pem(value: PemArg, what: str) -> Optional[bytes]:
    """PEM bytes from bytes, PEM text, or the path of a PEM file."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"tls {what}: cannot read {value!r}: {e}") from e


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the connection to Backstop (``Backstop(address, tls=TLSConfig(...))``).

    Each value is PEM bytes, PEM text, or the path of a PEM file.

    :param root_certificates: CA certificates to trust (default: the system roots).
    :param certificate_chain: client certificate, for mutual TLS (with ``private_key``).
    :param private_key: the client certificate's key.
    :param server_name: the name to verify the server's certificate against
        when it differs from the address's host (e.g. connecting by IP).
    """

    root_certificates: PemArg = None
    certificate_chain: PemArg = None
    private_key: PemArg = None
    server_name: Optional[str] = None

    def credentials(self) -> grpc.ChannelCredentials:
        chain = _pem(self.certificate_chain, "certificate_chain")
        key = _pem(self.private_key, "private_key")
        if (chain is None) != (key is None):
            raise ValueError("tls: certificate_chain and private_key go together (mutual TLS needs both)")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates, "root_certificates"),
            private_key=key,
            certificate_chain=chain,
        )

    def channel_options(self) -> List[Tuple[str, Any]]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def sync_channel(
    address: str, credentials: Optional[grpc.ChannelCredentials], options: List[Tuple[str, Any]]
) -> grpc.Channel:
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def aio_channel(
    address: str, credentials: Optional[grpc.ChannelCredentials], options: List[Tuple[str, Any]]
) -> grpc.aio.Channel:
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)


class Stubs:
    """The generated gRPC stubs on the client's channel, for calls the wrapper
    does not cover (e.g. ``stubs.events.Watch``). On an asyncio client's
    channel the same stubs return awaitables."""

    def __init__(self, channel: Any) -> None:
        # The generated stub classes are untyped; their methods are used through Any.
        self.resilience: Any = resilience_pb2_grpc.ResilienceStub(channel)  # type: ignore[no-untyped-call]
        self.admin: Any = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
        self.deferred: Any = deferred_pb2_grpc.DeferredStub(channel)  # type: ignore[no-untyped-call]
        self.events: Any = events_pb2_grpc.EventsStub(channel)  # type: ignore[no-untyped-call]


#: A sync ``grpc.Channel`` or a ``grpc.aio.Channel``.
C = TypeVar("C")


class Replica(Generic[C]):
    """One address the client was given: its channel (balanced over every server
    the address resolves to), stubs, health probe, and whether it is down."""

    def __init__(self, target: str, connect: Callable[[str, bool], C]) -> None:
        self.target = target
        self._connect = connect
        self.channel: C = connect(target, False)
        self.stubs = Stubs(self.channel)
        self.health: Any = self.channel.unary_unary(HEALTH_METHOD)  # type: ignore[attr-defined]
        self._lock = threading.Lock()
        self._queue_channel: Optional[C] = None
        self._queue_stubs: Optional[Stubs] = None
        #: Set by an outage answer, cleared by a health check (or a call) that gets through.
        self.down = False
        #: The replica's Decide stream (``_stream``), set by the client that owns it
        #: when decisions go over a stream; None for unary calls.
        self.decide: Any = None

    def queue_stubs(self) -> Stubs:
        """Stubs for deferred-queue calls. They stay on one server (the queue is
        shared through Redis, but a Defer is never retried elsewhere, so it is
        never saved twice): the main channel when the address is one server,
        else a second, ``pick_first`` channel (created on first use)."""
        with self._lock:
            if self._queue_stubs is None:
                if single_server(self.target):
                    self._queue_stubs = self.stubs
                else:
                    self._queue_channel = self._connect(self.target, True)
                    self._queue_stubs = Stubs(self._queue_channel)
            return self._queue_stubs

    def channels(self) -> List[C]:
        with self._lock:
            return [self.channel] + ([self._queue_channel] if self._queue_channel is not None else [])


class ReplicaSet(Generic[C]):
    """The replicas of one client and which to try, in which order.

    Decisions are spread round robin over the replicas that are up; a replica
    whose call fails with UNAVAILABLE / DEADLINE_EXCEEDED is marked down and the
    call goes on to the next one, so the client falls back to its local
    fail-safe only when every replica has failed. A replica marked down gets no
    traffic (except as a last resort) until the client's background probe
    finds it serving again. Deferred-queue calls stay on one replica (the first
    listed that is up, then whichever answered last): the queue itself is shared
    through Redis, but a Defer is not retried on another replica (it must not be
    saved twice).

    With a single address nothing is ever marked down: an outage is the
    client's switch to local decisions, as it always was.
    """

    def __init__(self, targets: Sequence[str], connect: Callable[[str, bool], C]) -> None:
        self.replicas: List[Replica[C]] = [Replica(t, connect) for t in targets]
        self._lock = threading.Lock()
        # One turn per method: with a single shared turn, an agent's steady
        # CanProceed, RecordOutcome, CanProceed... would send every CanProceed
        # to the same replica of two.
        self._turns: Dict[str, int] = {}
        self._sticky = 0

    @property
    def first(self) -> Replica[C]:
        return self.replicas[0]

    @property
    def multiple(self) -> bool:
        return len(self.replicas) > 1

    def _up_first(self, start: int) -> List[Replica[C]]:
        ring = self.replicas[start:] + self.replicas[:start]
        return [r for r in ring if not r.down] + [r for r in ring if r.down]

    def balanced(self, method: str) -> List[Replica[C]]:
        """Replicas to try for a decision or admin call, in order: the ones up,
        starting with the next in ``method``'s turn, then the ones marked down."""
        if not self.multiple:
            return list(self.replicas)
        with self._lock:
            start = self._turns.get(method, 0)
            self._turns[method] = (start + 1) % len(self.replicas)
        return self._up_first(start)

    def sticky(self) -> List[Replica[C]]:
        """Replicas to try for a deferred-queue call: the queue's replica first."""
        if not self.multiple:
            return list(self.replicas)
        with self._lock:
            start = self._sticky
        return self._up_first(start)

    def queue_replica(self) -> Replica[C]:
        return self.sticky()[0]

    def failed(self, replica: Replica[C], err: object) -> None:
        """An outage answer from ``replica``: marks it down (logged once per outage)."""
        if not self.multiple:
            return
        with self._lock:
            was_up = not replica.down
            replica.down = True
        if was_up:
            log.warning("Backstop replica %s is unreachable (%s); using the other replicas", replica.target, err)

    def succeeded(self, replica: Replica[C], *, queue: bool = False) -> None:
        """``replica`` answered (a call, or a health check saying SERVING)."""
        if not self.multiple:
            return
        with self._lock:
            was_down = replica.down
            replica.down = False
            if queue:
                self._sticky = self.replicas.index(replica)
        if was_down:
            log.warning("Backstop replica %s is reachable again", replica.target)

    def down(self) -> List[Replica[C]]:
        return [r for r in self.replicas if r.down]

    def channels(self) -> List[C]:
        return [c for r in self.replicas for c in r.channels()]


def is_outage(e: grpc.RpcError) -> bool:
    code = e.code() if callable(getattr(e, "code", None)) else None
    return code in OUTAGE_CODES
