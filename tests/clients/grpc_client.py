"""A gRPC client from grpcio (C core), for the mesh's end-to-end tests.

Usage: grpc_client.py PROXY_ADDR SERVICE
Calls the test server's methods through a weft proxy (the service is the
:authority) and prints one JSON object with what it saw.
"""
import json
import sys

import grpc


def main():
    proxy, service = sys.argv[1], sys.argv[2]
    options = [("grpc.default_authority", service), ("grpc.enable_http_proxy", 0)]
    out = {}
    with grpc.insecure_channel(proxy, options=options) as channel:
        unary = channel.unary_unary("/test.Test/Unary")
        out["ok"] = unary(b"ping", timeout=10).decode()
        try:
            unary(b"fail:5:widget 42 is missing", timeout=10)
            out["error"] = None
        except grpc.RpcError as e:
            out["error"] = [e.code().name, e.details()]
        try:
            unary(b"sleep:3000", timeout=0.3)
            out["deadline"] = None
        except grpc.RpcError as e:
            out["deadline"] = e.code().name
        count = channel.unary_stream("/test.Test/Count")
        out["stream"] = [m.decode() for m in count(b"5", timeout=10)]
        total = channel.stream_unary("/test.Test/Sum")
        out["sum"] = total(iter([b"a" * i for i in range(10)]), timeout=10).decode()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
