#!/usr/bin/env python3
"""Calls a private gRPC service through a backchannel hub that enforces an
access policy, with Python grpcio and a bearer token.

Usage: call_with_token.py HUB_ADDR PEER_NAME TOKEN

The service behind the agent answers Echo.Unary with `server` set to
"<name> caller=<backchannel-caller> auth=<whether it saw authorization>", so
the caller can check what the hub told the service. Hand-encoded protobuf,
only `pip install grpcio`. Exits 0 when every check passes.
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


def echo_request(message):
    """backchannel.testing.v1.EchoRequest {message = 1}."""
    m = message.encode()
    return b"\x0a" + varint(len(m)) + m


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
    """backchannel.testing.v1.EchoResponse {message = 1; server = 2}."""
    fields = {1: "", 2: ""}
    i = 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire != 2:
            raise ValueError(f"unexpected wire type {wire}")
        n, i = read_varint(buf, i)
        fields[field] = buf[i : i + n].decode()
        i += n
    return fields[1], fields[2]


def expect_error(unary, metadata, code, what):
    try:
        unary(echo_request("x"), metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        assert e.code() == code, f"{what}: {e.code()} {e.details()}"
        return
    raise AssertionError(f"{what}: the call succeeded")


def main():
    hub, peer, token = sys.argv[1], sys.argv[2], sys.argv[3]
    route = [("backchannel-peer", peer)]
    bearer = [("authorization", f"Bearer {token}")]
    checks = 0
    with grpc.insecure_channel(hub) as ch:
        unary = ch.unary_unary("/backchannel.testing.v1.Echo/Unary")

        # The right token; a forged caller header is replaced by the hub.
        raw = unary(
            echo_request("hello with a token"),
            metadata=route + bearer + [("backchannel-caller", "ops")],
            timeout=10,
        )
        msg, server = echo_response(raw)
        assert msg == "hello with a token", msg
        assert server == "private caller=py-caller auth=false", server
        checks += 1

        expect_error(unary, route, grpc.StatusCode.UNAUTHENTICATED, "no token")
        checks += 1
        expect_error(
            unary,
            route + [("authorization", "Bearer not-the-token")],
            grpc.StatusCode.UNAUTHENTICATED,
            "wrong token",
        )
        checks += 1
        expect_error(
            unary,
            [("backchannel-peer", "not-allowed")] + bearer,
            grpc.StatusCode.PERMISSION_DENIED,
            "forbidden peer",
        )
        checks += 1

    print(f"python grpcio token client: all {checks} checks ok")


if __name__ == "__main__":
    main()
