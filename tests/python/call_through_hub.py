#!/usr/bin/env python3
"""Calls a private gRPC service through a backchannel hub with Python grpcio.

Usage: call_through_hub.py HUB_ADDR PEER_NAME

The hub routes every call whose metadata has `backchannel-peer: <name>` to
that agent. This client knows nothing about backchannel: it is a plain gRPC
client with one extra metadata key. It calls backchannel.testing.v1.Echo with
hand-encoded protobuf (no generated code, only `pip install grpcio`).
Exits 0 when every check passes.
"""

import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def echo_request(message, count=0):
    """backchannel.testing.v1.EchoRequest {message = 1; count = 2}."""
    m = message.encode()
    out = b"\x0a" + varint(len(m)) + m
    if count:
        out += b"\x10" + varint(count)
    return out


def read_varint(buf, i):
    shift = n = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def echo_response(buf):
    """backchannel.testing.v1.EchoResponse {message = 1; server = 2} -> (message, server)."""
    fields = {1: "", 2: ""}
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 2:
            n, i = read_varint(buf, i)
            fields[field] = buf[i : i + n].decode()
            i += n
        elif wire == 0:
            _, i = read_varint(buf, i)
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return fields[1], fields[2]


def main():
    hub, peer = sys.argv[1], sys.argv[2]
    route = [("backchannel-peer", peer)]
    checks = 0
    with grpc.insecure_channel(hub) as ch:
        unary = ch.unary_unary("/backchannel.testing.v1.Echo/Unary")
        server_stream = ch.unary_stream("/backchannel.testing.v1.Echo/ServerStream")
        client_stream = ch.stream_unary("/backchannel.testing.v1.Echo/ClientStream")
        bidi = ch.stream_stream("/backchannel.testing.v1.Echo/Bidi")

        raw, call = unary.with_call(
            echo_request("hello from python"),
            metadata=route + [("x-req", "py")],
            timeout=10,
        )
        msg, server = echo_response(raw)
        assert msg == "hello from python", msg
        assert server == "private", server
        headers = dict(call.initial_metadata())
        assert headers.get("x-echo") == "py", headers
        checks += 1

        got = [echo_response(r)[0] for r in server_stream(echo_request("s", 3), metadata=route, timeout=10)]
        assert got == ["s-0", "s-1", "s-2"], got
        checks += 1

        raw = client_stream(iter([echo_request(m) for m in "abc"]), metadata=route, timeout=10)
        assert echo_response(raw)[0] == "abc"
        checks += 1

        got = [echo_response(r)[0] for r in bidi(iter([echo_request(m) for m in "xyz"]), metadata=route, timeout=10)]
        assert got == ["x", "y", "z"], got
        checks += 1

        try:
            unary(echo_request("x"), metadata=[("backchannel-peer", "no-such-peer")], timeout=10)
            raise AssertionError("unknown peer did not fail")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e.code()
            assert "no-such-peer" in e.details(), e.details()
        checks += 1

        try:
            unary(echo_request("sleep:5000"), metadata=route, timeout=0.3)
            raise AssertionError("deadline did not fire")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.code()
        checks += 1

    print(f"python grpcio client: all {checks} checks ok")


if __name__ == "__main__":
    main()
