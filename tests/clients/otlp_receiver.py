"""An OTLP/gRPC trace receiver built from the OpenTelemetry project's own
generated service (PyPI: opentelemetry-proto, grpcio), for the trace tests.

Usage: otlp_receiver.py
Prints `listening PORT`, then one JSON line per span received:
{"node", "trace_id", "span_id", "parent_span_id", "name", "kind",
 "attributes": {key: value}, "status_code"}.
"""

import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)
from opentelemetry.proto.trace.v1 import trace_pb2


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    line = {
                        "node": resource.get("weft.node"),
                        "service_name": resource.get("service.name"),
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": trace_pb2.Span.SpanKind.Name(span.kind),
                        "attributes": {a.key: value(a.value) for a in span.attributes},
                        "status_code": trace_pb2.Status.StatusCode.Name(span.status.code),
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                    }
                    print(json.dumps(line), flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
