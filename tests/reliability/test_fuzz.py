"""Fuzz the server: property-based Classify, ClassifyStream and ModelInfer requests.

Random bytes as images, truncated and bit-flipped PNG/JPEG/BMP/WebP, crafted PNG headers that
declare 1x1 .. 2^31 pixels (decompression bombs), random tensor shapes, dtypes and byte counts,
NaN/Inf, top_k and classification k from negative to huge, odd model names (empty, ``../``,
NUL, 300 characters of unicode). Every answer must be a proper status (never INTERNAL or
UNKNOWN, never a dropped connection), and after every case a good request is answered
correctly. One server for the whole module. Quick: 300 cases, derandomized (``make test``);
``ZOO_RELIABILITY=full``: 5,000.
"""
from __future__ import annotations

import collections
import io
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from tests.reliability.conftest import FULL, INPUT_SIZE, report, running

CASES = 5000 if FULL else 300
CODE = grpc.StatusCode
# A client mistake gets one of these; anything else (INTERNAL, UNKNOWN, UNAVAILABLE after a
# dropped connection, CANCELLED, DEADLINE_EXCEEDED of a hung call) fails the test.
PROPER = {CODE.OK, CODE.INVALID_ARGUMENT, CODE.NOT_FOUND, CODE.RESOURCE_EXHAUSTED}
MODELS = ("resnext_mini", "densenet_mini")
CALL_TIMEOUT_S = 30


# --------------------------------------------------------------------------- inputs


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def _base_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for h, w in ((1, 1), (5, 7), (40, 52)):
        for channels in (1, 3, 4):
            shape = (h, w) if channels == 1 else (h, w, channels)
            array = rng.integers(0, 256, size=shape, dtype=np.uint8)
            for fmt in ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF"):
                if fmt == "JPEG" and channels == 4:
                    continue
                out.append(_encode(array, fmt))
    return out


BASE_IMAGES = _base_images()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def crafted_png(width: int, height: int, color_type: int = 2, depth: int = 8, idat: bytes = b"") -> bytes:
    """A PNG whose header declares ``width x height``, whatever its (small) pixel data holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(idat)) + _chunk(b"IEND", b"")


@st.composite
def mutated_image(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(BASE_IMAGES)))
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


DIMS = st.sampled_from([0, 1, 2, 33, 20000, 65535, 100000, 2**31 - 1, 2**32 - 1])
BOMBS = st.builds(crafted_png, DIMS, DIMS, st.sampled_from([0, 2, 3, 4, 6, 7]), st.sampled_from([1, 8, 16, 3]),
                  st.sampled_from([b"", b"\x00" * 4, b"\x00\xff\x00\x00", b"\x00" * 5000, b"garbage"]))
IMAGES = st.one_of(st.binary(max_size=4096), mutated_image(), BOMBS, st.sampled_from(BASE_IMAGES),
                   st.sampled_from(BASE_IMAGES))

NAMES = st.one_of(
    st.sampled_from(MODELS), st.sampled_from(MODELS), st.sampled_from(MODELS), st.sampled_from(MODELS), st.just(""),
    st.sampled_from(["../", "../../etc/passwd", "/etc/passwd", "resnext_mini\x00", "\x00", ".", "..",
                     "resnext_mini/../densenet_mini", "RESNEXT_MINI", " resnext_mini", "~", "%2e%2e%2f"]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x80, exclude_categories=("Cs",)), min_size=300, max_size=300))
TOP_K = st.one_of(st.integers(-3, 12), st.sampled_from([-2**31, 2**31 - 1, 1000]))
VERSION = st.one_of(st.just(0), st.just(0), st.just(1), st.integers(-2, 3), st.sampled_from([-2**63, 2**63 - 1]))
SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e38, -1e38, 65504.0, 1e-45]
SHAPES = st.one_of(
    st.sampled_from([[3, 32, 32], [1, 3, 32, 32], [32, 32, 3], [5, 7, 3]]),
    st.sampled_from([[3, 32, 32], [1, 3, 32, 32], [32, 32, 3], [5, 7, 1], [5, 7, 4], [5, 7, 2], [2, 3, 32, 32],
                     [32, 32], [1, 1, 1], [0, 32, 32], [3, 0, 32], [], [0], [-1, 32, 3], [3, -32, -32],
                     [20000, 20000, 3], [2**31, 2**31, 3], [2**62, 2, 3], [1, 2**40, 3]]),
    st.lists(st.integers(-2, 70), max_size=5),
    st.lists(st.integers(-2**63, 2**63 - 1), max_size=4))
DTYPES = st.sampled_from(["float32", "float16", "uint8", "float32", "uint8", "float64", "int8", "", "FLOAT32",
                          "float32\x00"])
_ITEMSIZE = {"float32": 4, "float16": 2, "uint8": 1}
_NP = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}


def _count(shape: list[int]) -> int | None:
    """Element count when it is small and non-negative, else None."""
    if any(d < 0 for d in shape):
        return None
    n = 1
    for d in shape:
        n *= d
        if n > 200_000:
            return None
    return n


@st.composite
def tensor_data(draw, shape: list[int], dtype: str) -> bytes:
    """Bytes that fit ``shape``/``dtype`` (possibly NaN/Inf), or a random count of random bytes."""
    n = _count(shape)
    if n is None or dtype not in _ITEMSIZE or draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=1024))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        data = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
    else:
        x = rng.standard_normal(n).astype(_NP[dtype])
        if n and draw(st.booleans()):
            with np.errstate(over="ignore"):  # 1e38 as float16 is inf: on purpose
                x[rng.integers(0, n, size=draw(st.integers(1, 4)))] = draw(st.sampled_from(SPECIAL))
        data = x.tobytes()
    cut = draw(st.sampled_from([0, 0, 0, 1, -1, 7]))
    return data[:len(data) - cut] if cut > 0 else data + b"\x00" * -cut


@st.composite
def classify_request(draw) -> pb.ClassifyRequest:
    request = pb.ClassifyRequest(model=draw(NAMES), version=draw(VERSION), top_k=draw(TOP_K),
                                 request_id=draw(st.text(max_size=20)), return_logits=draw(st.booleans()))
    which = draw(st.sampled_from(["image", "image", "tensor", "tensor", "none"]))
    if which == "image":
        request.image = draw(IMAGES)
    elif which == "tensor":
        shape, dtype = draw(SHAPES), draw(DTYPES)
        request.tensor.CopyFrom(pb.Tensor(shape=shape, dtype=dtype, data=draw(tensor_data(shape, dtype))))
    return request


KDATATYPES = st.sampled_from(["FP32", "FP32", "FP16", "UINT8", "INT64", "BYTES", "", "fp32", "FP64"])
KSHAPES = st.one_of(
    st.sampled_from([[1, 3, 32, 32], [2, 3, 32, 32], [1, 5, 7, 3]]),
    st.sampled_from([[1, 3, 32, 32], [2, 3, 32, 32], [17, 3, 32, 32], [0, 3, 32, 32], [1, 5, 7, 3], [2, 5, 7, 1],
                     [1, 5, 7, 4], [1, 5, 7, 2], [1, 20000, 20000, 3], [1, 2**31, 2**31, 3], [3, 32, 32],
                     [-1, 3, 32, 32], [], [1, 3, 32, 32, 1]]),
    st.lists(st.integers(-2**63, 2**63 - 1), max_size=5))
PARAMETER = st.one_of(st.builds(kpb.InferParameter, int64_param=st.integers(-2**63, 2**63 - 1)),
                      st.builds(kpb.InferParameter, int64_param=st.integers(-2, 12)),
                      st.builds(kpb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
                      st.builds(kpb.InferParameter, bool_param=st.booleans()),
                      st.builds(kpb.InferParameter, string_param=st.text(max_size=10)),
                      st.builds(kpb.InferParameter, double_param=st.sampled_from(SPECIAL)),
                      st.just(kpb.InferParameter()))
PARAM_KEYS = st.sampled_from(["classification", "classification", "binary_data", "shared_memory_region", "", "x"])


@st.composite
def infer_request(draw) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=draw(NAMES), id=draw(st.text(max_size=10)),
                                    model_version=draw(st.one_of(st.just(""), st.just("1"),
                                                                 st.sampled_from(["", "1", "2", "0", "-1", "01"]),
                                                                 st.text(max_size=8))))
    raw = draw(st.booleans())
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        datatype, shape = draw(KDATATYPES), draw(KSHAPES)
        tensor = request.inputs.add(name=draw(st.sampled_from(["input", "input", "logits", ""])), datatype=datatype,
                                    shape=shape)
        if draw(st.integers(0, 9)) == 0:
            tensor.parameters[draw(PARAM_KEYS)].CopyFrom(draw(PARAMETER))
        dtype = {"FP32": "float32", "FP16": "float16", "UINT8": "uint8"}.get(datatype, "")
        n = _count(shape)
        if raw:
            request.raw_input_contents.append(draw(tensor_data(shape, dtype)))
            if draw(st.integers(0, 9)) == 0:
                request.raw_input_contents.append(b"")
        elif n is not None and n <= 20_000 and draw(st.integers(0, 4)):
            extra = draw(st.sampled_from([0, 0, 1, -1]))
            count = max(n + extra, 0)
            if datatype == "UINT8":
                tensor.contents.uint_contents.extend([draw(st.sampled_from([0, 255, 256, 2**32 - 1]))] * count)
            else:
                values = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(count)
                if count and draw(st.booleans()):
                    values[0] = draw(st.sampled_from(SPECIAL))
                tensor.contents.fp32_contents.extend(values.tolist())
        elif draw(st.booleans()):
            tensor.contents.int64_contents.extend(draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=5)))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):
        out = request.outputs.add(name=draw(st.sampled_from(["logits", "logits", "probs", ""])))
        for _ in range(draw(st.integers(0, 2))):
            out.parameters[draw(PARAM_KEYS)].CopyFrom(draw(PARAMETER))
    return request


CASE = st.one_of(st.tuples(st.just("Classify"), classify_request()),
                 st.tuples(st.just("ModelInfer"), infer_request()),
                 st.tuples(st.just("ClassifyStream"), st.lists(classify_request(), min_size=1, max_size=3)))


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def fuzz_server(repo):
    with running(repo, max_batch=4, batch_timeout_ms=1.0) as (server, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield server, pb_grpc.ClassifierStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)


def _check_classify(request: pb.ClassifyRequest, response: pb.ClassifyResponse) -> None:
    want = min(request.top_k or 5, 10)
    assert len(response.classes) == want
    scores = [c.score for c in response.classes]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert response.request_id == request.request_id
    assert len(response.logits) == (10 if request.return_logits else 0)
    assert np.all(np.isfinite(response.logits))


def test_fuzz_requests_always_get_a_proper_status(fuzz_server, repo):
    server, stub, kstub = fuzz_server
    good_x = np.random.default_rng(123).standard_normal(INPUT_SIZE).astype(np.float32)
    good = pb.ClassifyRequest(model="resnext_mini", return_logits=True,
                              tensor=pb.Tensor(shape=INPUT_SIZE, dtype="float32", data=good_x.tobytes()))
    want = repo.get("resnext_mini").run(good_x[None])[0]
    codes: collections.Counter = collections.Counter()
    per_rpc: collections.Counter = collections.Counter()
    t0 = time.monotonic()

    def call(fn, *args):
        try:
            return CODE.OK, fn(*args, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            return e.code(), e.details()

    @settings(max_examples=CASES, deadline=None, derandomize=not FULL, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(case=CASE)
    def one(case):
        rpc, request = case
        per_rpc[rpc] += 1
        if rpc == "Classify":
            code, answer = call(stub.Classify, request)
            if code == CODE.OK:
                _check_classify(request, answer)
            seen = [code]
        elif rpc == "ModelInfer":
            code, answer = call(kstub.ModelInfer, request)
            if code == CODE.OK:
                out = answer.outputs[0]
                assert out.name == "logits" and out.shape[0] == request.inputs[0].shape[0]
            seen = [code]
        else:
            code, answer = call(lambda r, timeout: list(stub.ClassifyStream(iter(r), timeout=timeout)), request)
            seen = [code]
            if code == CODE.OK:
                assert [a.index for a in answer] == list(range(len(request)))
                for item, a in zip(request, answer):
                    if a.WhichOneof("result") == "error":
                        seen.append(CODE(next(c for c in CODE if c.value[0] == a.error.code)))
                    else:
                        _check_classify(item, a.response)
                        seen.append(CODE.OK)
                seen = seen[1:]
        for c in seen:
            codes[c.name] += 1
        assert all(c in PROPER for c in seen), f"{rpc}: {seen} {answer!r:.500}"
        # ... and the server still answers a good request correctly.
        r = stub.Classify(good, timeout=CALL_TIMEOUT_S)
        np.testing.assert_allclose(r.logits, want, rtol=1e-4, atol=1e-4)

    one()
    elapsed = time.monotonic() - t0
    r = stub.Classify(good, timeout=CALL_TIMEOUT_S)
    np.testing.assert_allclose(r.logits, want, rtol=1e-4, atol=1e-4)
    assert server.core.slots._value == server.core.max_concurrency  # no slot leaked
    total = sum(per_rpc.values())
    report(f"fuzz: {total} cases ({', '.join(f'{k} {v}' for k, v in sorted(per_rpc.items()))}) in {elapsed:.0f} s; "
           f"status codes seen: {', '.join(f'{k} {v}' for k, v in codes.most_common())}; "
           f"a good request answered correctly after each")
    assert total >= CASES * 0.9
