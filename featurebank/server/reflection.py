"""Server reflection under both names tools ask for: grpc.reflection.v1 and v1alpha.

grpcio-reflection ships only v1alpha; current tools (grpcurl, Postman, grpcui) ask
for v1 first. The two protocols are the same messages under another package name, so
v1 is served by the same servicer, with v1's descriptors made from v1alpha's.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


def register_v1_descriptors() -> None:
    """Add grpc/reflection/v1/reflection.proto to the default pool (once), made from v1alpha's,
    so that reflection can describe its own v1 service and clients can build v1 messages."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    old, new = f".{v1alpha.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for m in service.method:
            m.input_type = m.input_type.replace(old, new)
            m.output_type = m.output_type.replace(old, new)
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(service_names: Sequence[str], server: aio.Server) -> None:
    """Serve reflection v1 and v1alpha for `service_names` (plus both reflection services)."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)  # v1alpha
    register_v1_descriptors()

    def parse(data: bytes) -> v1alpha.ServerReflectionRequest:
        return v1alpha.ServerReflectionRequest.FromString(data)

    def serialize(message: v1alpha.ServerReflectionResponse) -> bytes:
        return bytes(message.SerializeToString())

    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=parse, response_serializer=serialize
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
