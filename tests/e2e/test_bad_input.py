"""Invariant 5: bad input gets INVALID_ARGUMENT naming the problem, and the server keeps serving
(on either language engine)."""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import pytest
from PIL import Image

from language_server.engine.sampling import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from pipeline.client import image, message, sampling
from pipeline.errors import MAX_MESSAGE_CHARS
from proto.dvd.v1 import admin_pb2, admin_pb2_grpc
from proto.dvd.v1 import generate_pb2 as pb
from tests.conftest import photo_bytes


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def _huge_png(side: int) -> bytes:
    """A valid 1-bit PNG header of side x side with a small compressed body (never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    body = zlib.compress(row * 64)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _bmp() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "BMP")
    return buffer.getvalue()


def _ask(*parts) -> list[pb.Message]:
    return [message("user", *parts, "What is this?")]


BAD_REQUESTS = {
    "corrupt_image": (_ask(image(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 20)), {}, "image"),
    "zero_bytes": (_ask(pb.ContentPart(image=pb.ImageInput(data=b""))), {}, "image data is empty"),
    "unsupported_format": (_ask(image(_bmp())), {}, "BMP"),
    "one_pixel": (_ask(image(_png(1, 1))), {}, "too small"),
    "decompression_bomb": (_ask(image(_huge_png(20000))), {}, "20000x20000"),
    "empty_messages": ([], {}, "messages is empty"),
    "zero_max_new_tokens": (_ask(), {"max_new_tokens": 0}, "max_new_tokens"),
    "negative_max_new_tokens": (_ask(), {"max_new_tokens": -5}, "max_new_tokens"),
    "negative_temperature": (_ask(), {"temperature": -0.5}, "temperature"),
    "top_p_zero": (_ask(), {"top_p": 0.0}, "top_p"),
    "top_p_above_one": (_ask(), {"top_p": 1.01}, "top_p"),
    "tiny_repetition_penalty": (_ask(), {"repetition_penalty": 1e-30}, "repetition_penalty"),
    "too_many_stop_strings": (_ask(), {"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}, "limit of 16"),
    "long_stop_string": (_ask(), {"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}, "limit of 256"),
    "too_many_tiles": (_ask(image(photo_bytes("coffee"), max_tiles=40)), {}, "max_tiles"),
    "unset_role": ([pb.Message(content=[pb.ContentPart(text="hi")])], {}, "role is not set"),
    "assistant_last": ([message("user", "hi"), message("assistant", "hello")], {}, "last message"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_the_next_request_succeeds(case, engine_deployment, client_for):
    messages, params, expected = BAD_REQUESTS[case]
    client = client_for(engine_deployment)
    with pytest.raises(grpc.RpcError) as info:
        client.generate(messages, sampling(**params))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in info.value.details()
    good = client.generate(_ask(image(photo_bytes("astronaut"))), sampling(max_new_tokens=2))
    assert len(good.token_ids) == 2 and good.usage.image_tiles == 1


def test_streaming_call_reports_the_same_error(engine_deployment, client_for):
    with pytest.raises(grpc.RpcError) as info:
        list(client_for(engine_deployment).stream(_ask(image(_png(1, 1))), sampling(max_new_tokens=2)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_request_does_not_fail_a_concurrent_good_one(engine_deployment, client_for):
    client = client_for(engine_deployment)
    good = client.stub.GenerateUnary.future(
        pb.GenerateRequest(messages=_ask(image(photo_bytes("chelsea"))), sampling=sampling(max_new_tokens=4)),
        timeout=120,
    )
    bad = client.stub.GenerateUnary.future(
        pb.GenerateRequest(messages=_ask(image(b"garbage")), sampling=sampling(max_new_tokens=4)), timeout=120
    )
    assert bad.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(good.result().token_ids) == 4


def _text_request_bytes(text: bytes) -> bytes:
    """A serialized GenerateRequest whose text part holds `text` (any bytes, valid UTF-8 or not)."""
    placeholder = "P" * len(text)
    request = pb.GenerateRequest(messages=_ask(placeholder), sampling=sampling(max_new_tokens=2))
    return request.SerializeToString().replace(placeholder.encode(), text)


UNDECODABLE = {"bad_utf8": _text_request_bytes(b"\xff\xfe\xfa\xfb"), "garbage": b"\xff" * 40}


@pytest.mark.parametrize("method", ["Generate", "GenerateUnary"])
@pytest.mark.parametrize("case", list(UNDECODABLE))
def test_an_undecodable_request_is_invalid_argument(case, method, fp32_deployment, client_for):
    with grpc.insecure_channel(fp32_deployment.address) as channel:
        make = channel.unary_stream if method == "Generate" else channel.unary_unary
        call = make(f"/dvd.v1.Generation/{method}", request_serializer=lambda b: b,
                    response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            result = call(UNDECODABLE[case], timeout=60)
            list(result) if method == "Generate" else result
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request is not a valid dvd.v1.GenerateRequest" in info.value.details()
    good = client_for(fp32_deployment).generate(_ask(image(photo_bytes("astronaut"))), sampling(max_new_tokens=2))
    assert len(good.token_ids) == 2


def test_an_undecodable_request_to_the_vision_server_is_invalid_argument(fp32_deployment):
    vc = fp32_deployment.config.vision
    with grpc.insecure_channel(f"{vc.host}:{vc.grpc_port}") as channel:
        call = channel.unary_unary("/dvd.v1.Admin/GetServerInfo", request_serializer=lambda b: b,
                                   response_deserializer=admin_pb2.ServerInfo.FromString)
        with pytest.raises(grpc.RpcError) as info:
            call(UNDECODABLE["garbage"], timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "dvd.v1.GetServerInfoRequest" in info.value.details()
        assert admin_pb2_grpc.AdminStub(channel).GetServerInfo(admin_pb2.GetServerInfoRequest(), timeout=60).role == "vision"


@pytest.mark.parametrize("stop", [["x" * 100_000], ["", "x" * 100_000]], ids=["long", "long_and_empty"])
def test_an_over_long_field_gets_a_short_invalid_argument(stop, fp32_deployment, client_for):
    client = client_for(fp32_deployment)
    with pytest.raises(grpc.RpcError) as info:
        client.generate(_ask(), sampling(max_new_tokens=2, stop=stop))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop" in info.value.details() and len(info.value.details()) <= MAX_MESSAGE_CHARS
    assert len(client.generate(_ask(), sampling(max_new_tokens=2)).token_ids) == 2
