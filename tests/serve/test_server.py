"""The gRPC server in-process on 127.0.0.1:0: every RPC, bad input, batching, health, reflection,
metrics, limits, auth and TLS."""
from __future__ import annotations

import io
import shutil
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.runtime import load_repository
from tests.serve.conftest import (
    CLASSES,
    INPUT_SIZE,
    MEAN,
    SERVE_MODELS,
    STD,
    Gate,
    png_bytes,
    random_image,
    running,
    tensor_request,
)
from zoo import data as zdata
from zoo.checkpoint import load_checkpoint, model_from_checkpoint

CODE = grpc.StatusCode


def call_error(fn, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, **kw)
    return info.value


def reference_logits(session, x: np.ndarray) -> np.ndarray:
    return session.run(["logits"], {"input": x[None].astype(np.float32)})[0][0]


# --------------------------------------------------------------------------- the RPCs


def test_list_models(stub, repo):
    response = stub.ListModels(pb.ListModelsRequest())
    assert [m.name for m in response.models] == sorted(SERVE_MODELS)
    assert response.default_model == ""  # two models: requests must name one
    for m in response.models:
        assert m.version == 1 and list(m.labels) == CLASSES and list(m.input_size) == INPUT_SIZE
        assert np.allclose(m.mean, MEAN) and np.allclose(m.std, STD) and m.crop_pct == 1.0
        assert m.precision == "fp32" and m.norm == "bn" and m.max_batch == 16
        assert m.provider == "CPUExecutionProvider" == repo.get(m.name).session.get_providers()[0]
        assert m.source.startswith("checkpoint:")


@pytest.mark.parametrize("name", SERVE_MODELS)
def test_classify_tensor(stub, repo, name):
    x = np.random.default_rng(1).standard_normal(INPUT_SIZE).astype(np.float32)
    r = stub.Classify(tensor_request(x, model=name, top_k=3, request_id="abc", return_logits=True))
    assert (r.model, r.version, r.provider, r.request_id) == (name, 1, "CPUExecutionProvider", "abc")
    want = reference_logits(repo.get(name).session, x)
    np.testing.assert_allclose(r.logits, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    probs = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
    assert [c.index for c in r.classes] == list(np.argsort(-probs)[:3])
    for c in r.classes:
        assert c.label == CLASSES[c.index] and c.score == pytest.approx(probs[c.index], rel=1e-4)
    assert r.batch_size >= 1
    t = r.timing
    assert t.total_us >= t.inference_us > 0 and t.total_us >= t.queue_us >= 0 and t.preprocess_us == 0


def test_classify_image_uint8_and_float16(stub):
    pixels = random_image(7)
    by_image = stub.Classify(pb.ClassifyRequest(model="resnext_mini", image=png_bytes(pixels), return_logits=True))
    by_pixels = stub.Classify(tensor_request(pixels, model="resnext_mini", return_logits=True))
    np.testing.assert_allclose(by_pixels.logits, by_image.logits, rtol=1e-6, atol=1e-6)
    assert by_image.timing.decode_us > 0 and by_image.timing.preprocess_us > 0
    x = np.random.default_rng(2).standard_normal(INPUT_SIZE).astype(np.float16)
    half = stub.Classify(tensor_request(x[None], model="resnext_mini", return_logits=True))
    full = stub.Classify(tensor_request(x.astype(np.float32), model="resnext_mini", return_logits=True))
    np.testing.assert_allclose(half.logits, full.logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("top_k,expected", [(0, 5), (1, 1), (10, 10), (1000, 10)])
def test_top_k_default_and_cap(stub, top_k, expected):
    x = np.zeros(INPUT_SIZE, np.float32)
    r = stub.Classify(tensor_request(x, model="densenet_mini", top_k=top_k))
    assert len(r.classes) == expected
    scores = [c.score for c in r.classes]
    assert scores == sorted(scores, reverse=True)
    if expected == 10:
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_classify_stream_pipelines_in_order_and_survives_bad_items(stub, repo):
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal(INPUT_SIZE).astype(np.float32) for _ in range(24)]
    requests = [tensor_request(x, model="resnext_mini", request_id=f"r{i}", return_logits=True)
                for i, x in enumerate(xs)]
    requests.insert(5, pb.ClassifyRequest(model="resnext_mini", image=b"garbage", request_id="bad-image"))
    requests.insert(9, pb.ClassifyRequest(model="nope", image=b"x", request_id="bad-model"))
    out = list(stub.ClassifyStream(iter(requests), timeout=30))
    assert [o.index for o in out] == list(range(len(requests)))
    assert [o.request_id for o in out] == [r.request_id for r in requests]
    errors = {o.request_id: o.error for o in out if o.WhichOneof("result") == "error"}
    assert set(errors) == {"bad-image", "bad-model"}
    assert (errors["bad-image"].code == CODE.INVALID_ARGUMENT.value[0]
            and "not a readable image" in errors["bad-image"].message)
    assert errors["bad-model"].code == CODE.NOT_FOUND.value[0]
    session = repo.get("resnext_mini").session
    good = [o for o in out if o.WhichOneof("result") == "response"]
    for o, x in zip(good, xs):
        want = reference_logits(session, x)
        np.testing.assert_allclose(o.response.logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert max(o.response.batch_size for o in good) > 1  # the stream's items met in batches


def test_latency_report(stub):
    x = np.zeros(INPUT_SIZE, np.float32)
    for _ in range(5):
        stub.Classify(tensor_request(x, model="densenet_mini"))
    report = stub.GetLatencyReport(pb.LatencyReportRequest(model="densenet_mini"))
    (m,) = report.models
    assert m.model == "densenet_mini" and m.count >= 5 and m.total_requests >= 5 and m.window >= 1000
    for p in (m.total, m.queue, m.inference):
        assert 0 <= p.p50_us <= p.p90_us <= p.p99_us
    assert m.total.p50_us >= m.inference.p50_us > 0 and m.mean_batch_size >= 1
    every = stub.GetLatencyReport(pb.LatencyReportRequest())
    assert sorted(m.model for m in every.models) == sorted(SERVE_MODELS)
    err = call_error(stub.GetLatencyReport, pb.LatencyReportRequest(model="nope"))
    assert err.code() == CODE.NOT_FOUND and "densenet_mini, resnext_mini" in err.details()
    assert err.details().startswith("Request for unknown model: 'nope' is not found"), err.details()


# --------------------------------------------------------------------------- preprocessing parity with training


@pytest.mark.parametrize("name", SERVE_MODELS)
@pytest.mark.parametrize("mode,hw", [("RGB", (40, 52)), ("L", (64, 48)), ("RGB", (32, 32))])
def test_server_matches_pytorch_val_transform(stub, exported, name, mode, hw):
    """The same image through the server and through PyTorch (checkpoint + zoo.data.val_transform)."""
    model = model_from_checkpoint(load_checkpoint(exported.checkpoints[name])).eval()
    data = png_bytes(random_image(11, *hw, channels=3 if mode == "RGB" else 1), "PNG")
    x = zdata.val_transform(zdata.decode_image(data), INPUT_SIZE, MEAN, STD, crop_pct=1.0)
    with torch.no_grad():
        want = model(torch.from_numpy(x)[None])[0].numpy()
    r = stub.Classify(pb.ClassifyRequest(model=name, image=data, return_logits=True, top_k=10))
    got = np.asarray(r.logits)
    assert np.abs(want).max() > 0.1  # not a trivially tiny logit scale
    assert np.abs(got - want).max() <= 1e-3, (got, want)
    probs = torch.softmax(torch.from_numpy(want).double(), 0).numpy()
    for c in r.classes:
        assert abs(c.score - probs[c.index]) <= 1e-4


# --------------------------------------------------------------------------- bad input


TENSOR_CASES = [
    (pb.Tensor(shape=[3, 28, 28], dtype="float32", data=bytes(3 * 28 * 28 * 4)),
     r"shape [3, 28, 28] does not fit the model: expected [3, 32, 32]"),
    (pb.Tensor(shape=[3, 32, 32], dtype="int64", data=bytes(8)), "dtype 'int64' is not supported"),
    (pb.Tensor(shape=[3, 32, 32], dtype="float32", data=bytes(100)),
     "tensor data has 100 bytes; shape [3, 32, 32] float32 needs 12,288"),
    (pb.Tensor(shape=[3, 32, 32], dtype="float32", data=np.full(INPUT_SIZE, np.nan, np.float32).tobytes()),
     "NaN or Inf"),
    (pb.Tensor(shape=[3, 32, 32], dtype="float32", data=np.full(INPUT_SIZE, np.inf, np.float32).tobytes()),
     "NaN or Inf"),
]


@pytest.mark.parametrize("tensor,message", TENSOR_CASES)
def test_bad_tensor(stub, tensor, message):
    err = call_error(stub.Classify, pb.ClassifyRequest(model="resnext_mini", tensor=tensor))
    assert err.code() == CODE.INVALID_ARGUMENT and message in err.details()


@pytest.mark.parametrize("request_,code,message", [
    (pb.ClassifyRequest(model="resnext_mini", image=b""), CODE.INVALID_ARGUMENT, "image is empty"),
    (pb.ClassifyRequest(model="resnext_mini", image=b"GIF89a nope"), CODE.INVALID_ARGUMENT, "not a readable image"),
    (pb.ClassifyRequest(model="resnext_mini", image=png_bytes(random_image(1))[:300]), CODE.INVALID_ARGUMENT,
     "cannot decode image"),
    (pb.ClassifyRequest(model="resnext_mini"), CODE.INVALID_ARGUMENT, "request has no input"),
    (pb.ClassifyRequest(model="resnext_mini", image=b"x", top_k=-1), CODE.INVALID_ARGUMENT, "invalid top_k -1"),
    (pb.ClassifyRequest(model="resnext_mini", image=b"x", version=-2), CODE.INVALID_ARGUMENT, "invalid version -2"),
    (pb.ClassifyRequest(image=b"x"), CODE.INVALID_ARGUMENT, "request names no model"),
    (pb.ClassifyRequest(model="resnet9000", image=b"x"), CODE.NOT_FOUND,
     "Request for unknown model: 'resnet9000' is not found; this server serves: densenet_mini, resnext_mini"),
    (pb.ClassifyRequest(model="resnext_mini", version=7, image=b"x"), CODE.NOT_FOUND,
     "version 7 is not found (loaded: 1)"),
    # Names are looked up in the in-memory table only: no path reaches the disk.
    (pb.ClassifyRequest(model="../resnext_mini", image=b"x"), CODE.NOT_FOUND,
     "Request for unknown model: '../resnext_mini' is not found"),
    (pb.ClassifyRequest(model="/etc/passwd", image=b"x"), CODE.NOT_FOUND, "unknown model"),
    (pb.ClassifyRequest(model="resnext_mini/1/model.onnx", image=b"x"), CODE.NOT_FOUND, "unknown model"),
])
def test_bad_request(stub, request_, code, message):
    err = call_error(stub.Classify, request_)
    assert err.code() == code and message in err.details()


def test_decompression_bomb_is_invalid_argument(stub):
    buf = io.BytesIO()
    Image.new("1", (10_000, 8_000)).save(buf, "PNG")  # 80 MP declared in ~10 KB
    assert len(buf.getvalue()) < 100_000
    err = call_error(stub.Classify, pb.ClassifyRequest(model="resnext_mini", image=buf.getvalue()))
    assert err.code() == CODE.INVALID_ARGUMENT and "image too large: 10000x8000" in err.details()


def test_pixel_limit_is_configurable(repo):
    with running(repo, max_image_pixels=1000) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = pb_grpc.ClassifierStub(channel)
        err = call_error(s.Classify, pb.ClassifyRequest(model="resnext_mini", image=png_bytes(random_image(0, 40, 30))))
        assert err.code() == CODE.INVALID_ARGUMENT and "30x40 = 1,200 pixels, the limit is 1,000" in err.details()
        err = call_error(s.Classify, tensor_request(random_image(0, 40, 30), model="resnext_mini"))
        assert err.code() == CODE.INVALID_ARGUMENT and "uint8 tensor too large" in err.details()


def test_message_over_limit_is_resource_exhausted(stub):
    err = call_error(stub.Classify, pb.ClassifyRequest(model="resnext_mini", image=bytes(17 * 2**20)))
    assert err.code() == CODE.RESOURCE_EXHAUSTED
    # still serving
    assert stub.Classify(tensor_request(np.zeros(INPUT_SIZE, np.float32), model="resnext_mini")).classes


def test_server_keeps_serving_after_bad_input(stub):
    for request in (pb.ClassifyRequest(model="resnext_mini", image=b"junk"), pb.ClassifyRequest(model="?", image=b"")):
        call_error(stub.Classify, request)
    assert stub.Classify(pb.ClassifyRequest(model="resnext_mini", image=png_bytes(random_image(2)))).classes


# --------------------------------------------------------------------------- batching across clients


def test_concurrent_clients_each_get_their_own_answer(repo):
    """16 clients at once: every answer is the one for its own input, and some ran batched."""
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal(INPUT_SIZE).astype(np.float32) for _ in range(16)]
    session = repo.get("resnext_mini").session
    want = [reference_logits(session, x) for x in xs]
    with running(repo, max_batch=16, batch_timeout_ms=50) as (_, port):
        barrier = threading.Barrier(len(xs))
        results: list = [None] * len(xs)

        def client(i: int) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                s = pb_grpc.ClassifierStub(channel)
                s.ListModels(pb.ListModelsRequest())  # connect before the barrier
                barrier.wait(10)
                results[i] = s.Classify(tensor_request(xs[i], model="resnext_mini", request_id=str(i),
                                                       return_logits=True), timeout=30)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for i, r in enumerate(results):
        assert r is not None and r.request_id == str(i)
        np.testing.assert_allclose(r.logits, want[i], rtol=1e-4, atol=1e-4 * np.abs(want[i]).max())
    assert max(r.batch_size for r in results) > 1
    assert sum(r.batch_size > 1 for r in results) >= 2


def test_max_batch_one_turns_batching_off(repo):
    with running(repo, max_batch=1) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = pb_grpc.ClassifierStub(channel)
        requests = [tensor_request(np.zeros(INPUT_SIZE, np.float32), model="resnext_mini") for _ in range(12)]
        assert {o.response.batch_size for o in s.ClassifyStream(iter(requests))} == {1}
        assert s.ListModels(pb.ListModelsRequest()).models[0].max_batch == 1


def test_expired_deadline_dropped_from_queue(exported):
    repo = load_repository(exported.root, providers="cpu", threads=1, models=["resnext_mini"])
    model = repo.get("resnext_mini")
    gate = Gate(model.run)
    sizes: list[int] = []
    model.run = lambda x, *instance: (sizes.append(len(x)), gate(x, *instance))[1]
    with running(repo, max_batch=8, batch_timeout_ms=0) as (server, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = pb_grpc.ClassifierStub(channel)
        x = np.zeros(INPUT_SIZE, np.float32)
        gate.open.clear()
        blocker = s.Classify.future(tensor_request(x), timeout=30)  # the worker is now stuck on it
        assert gate.entered.wait(10)
        err = call_error(s.Classify, tensor_request(x), timeout=0.2)
        assert err.code() == CODE.DEADLINE_EXCEEDED
        queue = server.core.models.batchers[("resnext_mini", 1)]._queue
        # Until the server, too, holds the queued request for expired (a bound only a hang reaches).
        end = time.monotonic() + 60
        while not all(item.expired(time.monotonic()) for item in list(queue.queue)):
            assert time.monotonic() < end, "the expired request is still live in the queue"
            time.sleep(0.01)
        gate.open.set()
        assert blocker.result(30).batch_size == 1
        assert s.Classify(tensor_request(x), timeout=30).batch_size == 1
        assert sizes == [1, 1]  # the expired request never ran
        scrape = server.metrics.registry.get_sample_value
        assert scrape("zoo_serve_requests_total", {"model": "resnext_mini", "code": "DEADLINE_EXCEEDED"}) == 1.0


def test_over_max_concurrency_is_resource_exhausted(repo):
    with running(repo, max_concurrency=1) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = pb_grpc.ClassifierStub(channel)
        hold = threading.Event()
        first_sent = threading.Event()

        def requests():
            yield tensor_request(np.zeros(INPUT_SIZE, np.float32), model="resnext_mini")
            first_sent.set()
            hold.wait(30)

        stream = s.ClassifyStream(requests(), timeout=30)
        assert next(stream).WhichOneof("result") == "response"  # the stream holds the only slot
        err = call_error(s.Classify, tensor_request(np.zeros(INPUT_SIZE, np.float32), model="resnext_mini"))
        assert err.code() == CODE.RESOURCE_EXHAUSTED and "--max-concurrency 1" in err.details()
        assert s.ListModels(pb.ListModelsRequest()).models  # other RPCs still answer
        hold.set()
        assert list(stream) == []
        assert s.Classify(tensor_request(np.zeros(INPUT_SIZE, np.float32), model="resnext_mini")).classes


# --------------------------------------------------------------------------- repository behaviour


def test_deleted_model_file_keeps_being_served(exported, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(exported.root, root)
    repo = load_repository(str(root), providers="cpu", threads=1, models=["densenet_mini"])
    with running(repo) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = pb_grpc.ClassifierStub(channel)
        shutil.rmtree(root)
        r = s.Classify(tensor_request(np.zeros(INPUT_SIZE, np.float32)))  # the only model: the default
        assert r.model == "densenet_mini" and r.classes
        assert s.ListModels(pb.ListModelsRequest()).default_model == "densenet_mini"


# --------------------------------------------------------------------------- health, reflection, metrics


def test_health_overall_and_per_model(server):
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        h = health_pb2_grpc.HealthStub(channel)
        for service in ("", "zoo.serving.v1.Classifier", *SERVE_MODELS):
            assert (h.Check(health_pb2.HealthCheckRequest(service=service)).status
                    == health_pb2.HealthCheckResponse.SERVING)
        err = call_error(h.Check, health_pb2.HealthCheckRequest(service="nope"))
        assert err.code() == CODE.NOT_FOUND


def test_reflection_lists_services(server):
    with grpc.insecure_channel(f"127.0.0.1:{server[1]}") as channel:
        r = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = list(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"zoo.serving.v1.Classifier", "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= names
        (answer,) = list(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="zoo.serving.v1.Classifier")])))
        assert answer.file_descriptor_response.file_descriptor_proto


def test_metrics_scrape(server, stub):
    stub.Classify(tensor_request(np.zeros(INPUT_SIZE, np.float32), model="resnext_mini"))
    call_error(stub.Classify, pb.ClassifyRequest(model="resnext_mini", image=b"junk"))
    call_error(stub.Classify, pb.ClassifyRequest(model="no-such-model", image=b"junk"))
    text = urllib.request.urlopen(f"http://127.0.0.1:{server[0].metrics_port}/metrics", timeout=10).read().decode()
    for name in ("zoo_serve_requests_total", "zoo_serve_request_latency_seconds_bucket",
                 "zoo_serve_queue_latency_seconds_bucket", "zoo_serve_inference_latency_seconds_bucket",
                 "zoo_serve_batch_size_bucket"):
        assert name in text
    assert 'zoo_serve_requests_total{code="OK",model="resnext_mini"}' in text
    assert 'zoo_serve_requests_total{code="INVALID_ARGUMENT",model="resnext_mini"}' in text
    assert 'zoo_serve_requests_total{code="NOT_FOUND",model="unknown"}' in text  # client names never become labels
    assert "no-such-model" not in text


# --------------------------------------------------------------------------- security


def test_tls_and_bearer_token(repo, tls_files):
    key, cert = (tls_files / "key.pem").read_bytes(), (tls_files / "cert.pem").read_bytes()
    x = tensor_request(np.zeros(INPUT_SIZE, np.float32), model="resnext_mini")
    with running(repo, tls=(key, cert), token="s3cret-token") as (_, port):
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            s = pb_grpc.ClassifierStub(channel)
            assert s.Classify(x, metadata=[("authorization", "Bearer s3cret-token")], timeout=10).classes
            err = call_error(s.Classify, x, timeout=10)
            assert err.code() == CODE.UNAUTHENTICATED and "authorization: Bearer" in err.details()
            err = call_error(s.Classify, x, metadata=[("authorization", "Bearer wrong")], timeout=10)
            assert err.code() == CODE.UNAUTHENTICATED and "invalid bearer token" in err.details()
            err = call_error(lambda r, **kw: list(s.ClassifyStream(r, **kw)), iter([x]), timeout=10)  # streams too
            assert err.code() == CODE.UNAUTHENTICATED
            err = call_error(s.ListModels, pb.ListModelsRequest(), timeout=10)
            assert err.code() == CODE.UNAUTHENTICATED
            h = health_pb2_grpc.HealthStub(channel)  # health checks stay open
            assert h.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:  # the IP SAN
            assert pb_grpc.ClassifierStub(channel).Classify(x, metadata=[("authorization", "Bearer s3cret-token")],
                                                            timeout=10).classes
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # plaintext to a TLS port
            err = call_error(pb_grpc.ClassifierStub(channel).Classify, x, timeout=5)
            assert err.code() == CODE.UNAVAILABLE


def test_client_api_with_tls_and_token(repo, tls_files):
    from serve.client import Classifier, ClientError
    key, cert = (tls_files / "key.pem").read_bytes(), (tls_files / "cert.pem").read_bytes()
    with running(repo, tls=(key, cert), token="s3cret-token") as (_, port):
        with Classifier(f"localhost:{port}", token="s3cret-token", tls_ca=tls_files / "cert.pem") as c:
            r = c.classify(png_bytes(random_image(1)), model="resnext_mini", top_k=3)
            assert len(r.classes) == 3 and r.top.label in CLASSES and r.timing["total"] > 0
        with Classifier(f"localhost:{port}", tls_ca=cert) as c:
            with pytest.raises(ClientError) as info:
                c.classify(png_bytes(random_image(1)), model="resnext_mini")
            assert info.value.code == CODE.UNAUTHENTICATED


def test_an_idle_model_runs_a_lone_call_on_its_own_thread_and_streams_on_the_batcher(exported):
    """A unary call that finds its model idle and nothing queued runs it on the thread that took
    the call (no hand-off to the batcher's thread and back); a stream's rows never do (its
    read-ahead queues rows no caller is waiting on yet); under contention unary calls batch."""
    repo = load_repository(exported.root, providers="cpu", threads=1, models=["resnext_mini"])
    model = repo.get("resnext_mini")
    gate, ran_on = Gate(model.run), []
    model.run = lambda x, *instance: (ran_on.append((threading.current_thread().name, len(x))), gate(x, *instance))[1]
    x = np.zeros(INPUT_SIZE, np.float32)
    with running(repo, max_batch=8) as (server, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        s = pb_grpc.ClassifierStub(channel)
        assert s.Classify(tensor_request(x), timeout=30).batch_size == 1
        assert [list(s.ClassifyStream(iter([tensor_request(x)]), timeout=30))[0].response.batch_size] == [1]
        infer = kpb_grpc.GRPCInferenceServiceStub(channel)
        request = kpb.ModelInferRequest(model_name="resnext_mini", raw_input_contents=[x[None].tobytes()])
        request.inputs.add(name="input", datatype="FP32", shape=[1, *INPUT_SIZE])
        assert infer.ModelInfer(request, timeout=30).outputs
        stream_answer = next(infer.ModelStreamInfer(iter([request]), timeout=30))
        assert not stream_answer.error_message and stream_answer.infer_response.outputs
        # Contention: while a lone call holds the model, three more are submitted: they queue.
        batcher = server.core.models.batchers[("resnext_mini", 1)]
        submitted, submit = [], batcher.submit
        batcher.submit = lambda *a, **k: (submitted.append(1), submit(*a, **k))[1]
        gate.open.clear()
        gate.entered.clear()
        blocker = s.Classify.future(tensor_request(x), timeout=30)
        assert gate.entered.wait(30)
        waiting = [s.Classify.future(tensor_request(x), timeout=30) for _ in range(3)]
        end = time.monotonic() + 30
        while len(submitted) < 4:
            assert time.monotonic() < end, "the calls never reached the batcher"
            time.sleep(0.01)
        gate.open.set()
        assert blocker.result().batch_size == 1 and sum(w.result().batch_size > 1 for w in waiting) >= 2
        # A call of several rows never claims the idle model row by row: all its rows go to the batcher.
        before = len(ran_on)
        pair = kpb.ModelInferRequest(model_name="resnext_mini", raw_input_contents=[np.stack([x, x]).tobytes()])
        pair.inputs.add(name="input", datatype="FP32", shape=[2, *INPUT_SIZE])
        assert infer.ModelInfer(pair, timeout=30).raw_output_contents
        assert sum(rows for _, rows in ran_on[before:]) == 2, ran_on
        assert all(name.startswith("batcher") for name, _ in ran_on[before:]), ran_on
    (unary, _), (stream, _), (infer_unary, _), (infer_stream, _), (lone, _), *rest = ran_on
    assert all(name.startswith("grpc") for name in (unary, infer_unary, lone)), ran_on
    assert stream.startswith("batcher") and infer_stream.startswith("batcher"), ran_on
    assert rest and all(name.startswith("batcher") for name, _ in rest), ran_on


def test_with_a_batch_timeout_a_lone_call_waits_on_the_batcher(exported):
    """``--batch-timeout-ms`` above 0 asks every call to wait for its batch to fill: an idle model
    is not claimed on the call's own thread (that would run it alone at once)."""
    repo = load_repository(exported.root, providers="cpu", threads=1, models=["resnext_mini"])
    model = repo.get("resnext_mini")
    run, ran_on = model.run, []
    model.run = lambda x, *instance: (ran_on.append(threading.current_thread().name), run(x, *instance))[1]
    x = np.zeros(INPUT_SIZE, np.float32)
    with running(repo, max_batch=8, batch_timeout_ms=1) as (_, port), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        before = len(ran_on)
        assert pb_grpc.ClassifierStub(channel).Classify(tensor_request(x), timeout=30).batch_size == 1
        assert len(ran_on) == before + 1 and ran_on[-1].startswith("batcher"), ran_on
