"""The messages the Functions host and the Python language worker exchange, as protobuf classes.

In Azure, the host (a .NET process) talks gRPC to the Python worker process; on Python 3.13+ the
worker is a thin process that hands each message, as a protobuf object, to the worker runtime
library (`azure_functions_runtime`) together with the module of message classes, and the runtime
builds its answers from that module. The local host plays the host, and `worker_process.py`
plays that thin process; between them go these messages, serialized, one `StreamingMessage`
per frame (a 4-byte length, then the message) over a loopback socket instead of gRPC.

Only the messages and fields of the host's protocol that the runtime reads or writes are here.
Their names are the protocol's (the runtime reads them by name); only the two local processes
exchange them, so field numbers are merely unique, not the wire's. `tests/test_worker_runtime.py`
drives the runtime with them, so a runtime release that reads a field missing here fails there.
"""
from __future__ import annotations

import asyncio
import struct
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf import duration_pb2, timestamp_pb2  # noqa: F401  (registers the well-known types used below)

_PACKAGE = "AzureFunctionsRpcMessages"

# Nested enums: message -> {enum name: [value names in number order]}.
_ENUMS = {
    "StatusResult": {"Status": ["Failure", "Success", "Cancelled"]},
    "BindingInfo": {"Direction": ["in", "out", "inout"], "DataType": ["undefined", "string", "binary", "stream"]},
    "RpcRetryOptions": {"RetryStrategy": ["exponential_backoff", "fixed_delay"]},
    "RpcHttpCookie": {"SameSite": ["None", "Lax", "Strict", "ExplicitNone"]},
    "RpcSharedMemory": {"RpcDataType": ["unknown", "string", "json", "bytes", "stream", "http", "int", "double"]},
}

# Messages: name -> "field:type" items. A type is a scalar, a message or enum of this module, a
# well-known type (Duration, Timestamp), `[T]` for a repeated field, `{T}` for map<string, T>;
# `field:type|group` puts the field in the oneof `group`.
_MESSAGES = {
    "RpcException": "source:string stack_trace:string message:string is_user_exception:bool type:string",
    "StatusResult": "status:Status result:string exception:RpcException",
    "WorkerMetadata": "runtime_name:string runtime_version:string worker_version:string worker_bitness:string "
                      "custom_properties:{string}",
    "WorkerInitRequest": "host_version:string capabilities:{string} log_categories:{int32} worker_directory:string "
                         "function_app_directory:string",
    "WorkerInitResponse": "worker_version:string capabilities:{string} result:StatusResult worker_metadata:WorkerMetadata",
    "FunctionsMetadataRequest": "function_app_directory:string",
    "BindingInfo": "type:string direction:Direction data_type:DataType properties:{string}",
    "RpcRetryOptions": "max_retry_count:int32 delay_interval:Duration minimum_interval:Duration "
                       "maximum_interval:Duration retry_strategy:RetryStrategy",
    "RpcFunctionMetadata": "name:string directory:string script_file:string entry_point:string bindings:{BindingInfo} "
                           "is_proxy:bool language:string raw_bindings:[string] function_id:string "
                           "managed_dependency_enabled:bool retry_options:RpcRetryOptions properties:{string}",
    "FunctionMetadataResponse": "function_metadata_results:[RpcFunctionMetadata] result:StatusResult "
                                "use_default_metadata_indexing:bool",
    "FunctionLoadRequest": "function_id:string metadata:RpcFunctionMetadata managed_dependency_enabled:bool",
    "FunctionLoadResponse": "function_id:string result:StatusResult is_dependency_downloaded:bool",
    "CollectionBytes": "bytes:[bytes]",
    "CollectionString": "string:[string]",
    "CollectionDouble": "double:[double]",
    "CollectionSInt64": "sint64:[sint64]",
    "TypedData": "string:string|data json:string|data bytes:bytes|data stream:bytes|data http:RpcHttp|data "
                 "int:sint64|data double:double|data collection_bytes:CollectionBytes|data "
                 "collection_string:CollectionString|data collection_double:CollectionDouble|data "
                 "collection_sint64:CollectionSInt64|data",
    "NullableString": "value:string|string",
    "NullableDouble": "value:double|double",
    "NullableBool": "value:bool|bool",
    "NullableTimestamp": "value:Timestamp|timestamp",
    "RpcHttpCookie": "name:string value:string domain:NullableString path:NullableString expires:NullableTimestamp "
                     "secure:NullableBool http_only:NullableBool same_site:SameSite max_age:NullableDouble",
    "RpcHttp": "method:string url:string headers:{string} body:TypedData params:{string} status_code:string "
               "query:{string} enable_content_negotiation:bool rawBody:TypedData cookies:[RpcHttpCookie]",
    "RpcSharedMemory": "name:string offset:int64 count:int64 type:RpcDataType",
    "ParameterBinding": "name:string data:TypedData|rpc_data rpc_shared_memory:RpcSharedMemory|rpc_data",
    "RpcTraceContext": "trace_parent:string trace_state:string attributes:{string}",
    "RetryContext": "retry_count:int32 max_retry_count:int32 exception:RpcException",
    "InvocationRequest": "invocation_id:string function_id:string input_data:[ParameterBinding] "
                         "trigger_metadata:{TypedData} trace_context:RpcTraceContext retry_context:RetryContext",
    "InvocationResponse": "invocation_id:string output_data:[ParameterBinding] return_value:TypedData result:StatusResult",
    "StreamingMessage": "request_id:string worker_init_request:WorkerInitRequest|content "
                        "worker_init_response:WorkerInitResponse|content "
                        "functions_metadata_request:FunctionsMetadataRequest|content "
                        "function_metadata_response:FunctionMetadataResponse|content "
                        "function_load_request:FunctionLoadRequest|content function_load_response:FunctionLoadResponse|content "
                        "invocation_request:InvocationRequest|content invocation_response:InvocationResponse|content",
}

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "bool": _F.TYPE_BOOL, "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64, "sint64": _F.TYPE_SINT64, "double": _F.TYPE_DOUBLE,
}
_WELL_KNOWN = {"Duration": ".google.protobuf.Duration", "Timestamp": ".google.protobuf.Timestamp"}


def _set_type(field: descriptor_pb2.FieldDescriptorProto, owner: str, type_name: str) -> None:
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    elif type_name in _WELL_KNOWN:
        field.type, field.type_name = _F.TYPE_MESSAGE, _WELL_KNOWN[type_name]
    elif type_name in _ENUMS.get(owner, {}):
        field.type, field.type_name = _F.TYPE_ENUM, f".{_PACKAGE}.{owner}.{type_name}"
    elif type_name in _MESSAGES:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{_PACKAGE}.{type_name}"
    else:
        raise ValueError(f"{owner}: unknown type {type_name}")


def _describe(name: str, spec: str) -> descriptor_pb2.DescriptorProto:
    message = descriptor_pb2.DescriptorProto(name=name)
    for enum_name, values in _ENUMS.get(name, {}).items():
        message.enum_type.add(name=enum_name, value=[descriptor_pb2.EnumValueDescriptorProto(name=v, number=i)
                                                     for i, v in enumerate(values)])
    oneofs: list[str] = []
    for number, item in enumerate(spec.split(), start=1):
        field_name, _, type_spec = item.partition(":")
        type_spec, _, oneof = type_spec.partition("|")
        field = message.field.add(name=field_name, number=number, label=_F.LABEL_OPTIONAL)
        if oneof:
            if oneof not in oneofs:
                oneofs.append(oneof)
                message.oneof_decl.add(name=oneof)
            field.oneof_index = oneofs.index(oneof)
        if type_spec.startswith("["):
            field.label = _F.LABEL_REPEATED
            _set_type(field, name, type_spec[1:-1])
        elif type_spec.startswith("{"):
            entry = message.nested_type.add(name=f"{field_name.title().replace('_', '')}Entry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
            _set_type(entry.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL), name, type_spec[1:-1])
            field.label, field.type, field.type_name = _F.LABEL_REPEATED, _F.TYPE_MESSAGE, f".{_PACKAGE}.{name}.{entry.name}"
        else:
            _set_type(field, name, type_spec)
    return message


def _build() -> SimpleNamespace:
    file = descriptor_pb2.FileDescriptorProto(
        name="sekisho_local_host/function_rpc.proto", package=_PACKAGE, syntax="proto3",
        dependency=["google/protobuf/duration.proto", "google/protobuf/timestamp.proto"],
    )
    for name, spec in _MESSAGES.items():
        file.message_type.append(_describe(name, spec))
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(descriptor_pb2.FileDescriptorProto.FromString(
        duration_pb2.DESCRIPTOR.serialized_pb).SerializeToString())
    pool.AddSerializedFile(descriptor_pb2.FileDescriptorProto.FromString(
        timestamp_pb2.DESCRIPTOR.serialized_pb).SerializeToString())
    pool.Add(file)
    return SimpleNamespace(**{name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
                              for name in _MESSAGES})


protos = _build()
"""The module of message classes the runtime is given (`protos.InvocationRequest`, ...)."""


class WorkerRequest:
    """What the worker hands the runtime for each message: the message, and properties of the
    worker (the host name its HTTP server listens on, the message classes)."""

    __slots__ = ("request", "properties")

    def __init__(self, message, host: str) -> None:
        self.request = message
        self.properties = {"host": host, "protos": protos}


_LENGTH = struct.Struct(">I")


def frame(message) -> bytes:
    """A StreamingMessage as sent over the channel: its length, then its bytes."""
    data = message.SerializeToString()
    return _LENGTH.pack(len(data)) + data


async def until_listening(uri: str, timeout: float = 15.0) -> bool:
    """Wait until something accepts connections at `uri` (the runtime starts its web server as
    a task); False if nothing does within `timeout`."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(parts.hostname, parts.port)
            writer.close()
            return True
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.02)


async def read_message(reader: asyncio.StreamReader):
    """The next StreamingMessage from the channel; None when the other side has closed it."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        return protos.StreamingMessage.FromString(await reader.readexactly(_LENGTH.unpack(head)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
