"""Generated protobuf and gRPC stubs for ``backstop.v1``.

Do not edit: regenerate with ``python clients/python/scripts/gen_stubs.py``.
The idiomatic API is in :mod:`backstop`; these are for calls it does not wrap
(e.g. ``events_pb2_grpc.EventsStub`` for the live event stream).
"""
