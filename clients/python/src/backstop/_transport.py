"""gRPC plumbing shared by the sync and the asyncio client: channels, the
generated stubs, the health probe, and what an RPC error means.

Both clients (and the workers) import this module and nothing of each other,
so neither client can be pulled in by loading the other.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import grpc
import grpc.aio

from ._proto import admin_pb2_grpc, deferred_pb2_grpc, events_pb2_grpc, resilience_pb2_grpc
from .errors import ControlPlaneError, ControlPlaneUnavailable

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
    cls = ControlPlaneUnavailable if code in OUTAGE_CODES else ControlPlaneError
    return cls(code, details or "", method)


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
