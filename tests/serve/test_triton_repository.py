"""Triton's model control on the serve port: RepositoryIndex, RepositoryModelLoad/Unload in
``explicit`` mode, the repository followed in ``poll`` mode (hot reload under load), version_policy,
health per model, warmup before a model serves, and the flags of ``python -m serve``."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import serve.__main__ as serve_main
import serve.model_control
import serve.server
from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve.runtime import load_repository
from tests.serve.conftest import INPUT_SIZE, REPO_ROOT, running

CODE = grpc.StatusCode
MODEL = "resnext_mini"
OTHER = "densenet_mini"
X = np.random.default_rng(7).standard_normal((2, *INPUT_SIZE)).astype(np.float32)
# Only a hang reaches this (seconds): the poller and the clients run on their own time.
WAIT_S = 60


def infer_request(x: np.ndarray = X, model: str = MODEL, **kwargs) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model, **kwargs)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x).tobytes())
    return request


def logits_of(response: kpb.ModelInferResponse) -> np.ndarray:
    (out,) = response.outputs
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(out.shape))


def call_error(fn, request, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, **kw)
    return info.value


def wait_for(check, what: str) -> None:
    end = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < end, f"still waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def root(exported, tmp_path):
    """A repository this test may change: both models at version 1."""
    root = tmp_path / "models"
    shutil.copytree(exported.root, root)
    return root


@pytest.fixture(scope="module")
def want(exported):
    """The logits each exported model.onnx gives X (what a version built from it must answer)."""
    repo = load_repository(exported.root, providers="cpu", threads=1)
    return {name: repo.get(name).run(X) for name in (MODEL, OTHER)}


def onnx_of(exported, name: str) -> str:
    return os.path.join(exported.root, name, "1", "model.onnx")


def add_version(root, version: int, source: str) -> None:
    os.makedirs(root / MODEL / str(version))
    shutil.copyfile(source, root / MODEL / str(version) / "model.onnx")


@pytest.fixture
def channel():
    opened = []

    def make(port: int):
        opened.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
        return kpb_grpc.GRPCInferenceServiceStub(opened[-1]), health_pb2_grpc.HealthStub(opened[-1])
    yield make
    for c in opened:
        c.close()


def health_of(health, name: str) -> int:
    return health.Check(health_pb2.HealthCheckRequest(service=name)).status


# --------------------------------------------------------------------------- explicit


def test_explicit_load_unload_index_and_health(root, exported, want, channel):
    repo = load_repository(str(root), providers="cpu", threads=1, empty_ok=True)
    assert repo.names() == []
    with running(repo, model_control="explicit") as (_, port):
        stub, health = channel(port)
        index = stub.RepositoryIndex(kpb.RepositoryIndexRequest()).models
        assert [(m.name, m.version, m.state, m.reason) for m in index] == [
            (OTHER, "", "UNAVAILABLE", "unloaded"), (MODEL, "", "UNAVAILABLE", "unloaded")]
        assert not stub.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True)).models
        assert not stub.ModelReady(kpb.ModelReadyRequest(name=MODEL)).ready

        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL))
        assert stub.ModelReady(kpb.ModelReadyRequest(name=MODEL)).ready
        assert health_of(health, MODEL) == health_pb2.HealthCheckResponse.SERVING
        np.testing.assert_allclose(logits_of(stub.ModelInfer(infer_request())), want[MODEL], rtol=1e-5, atol=1e-5)
        ready = stub.RepositoryIndex(kpb.RepositoryIndexRequest(ready=True)).models
        assert [(m.name, m.version, m.state) for m in ready] == [(MODEL, "1", "READY")]

        # A version that does not load leaves the served one serving, and says why.
        add_version(root, 2, onnx_of(exported, MODEL))
        (root / MODEL / "2" / "model.onnx").write_bytes(b"not an onnx model")
        err = call_error(stub.RepositoryModelLoad, kpb.RepositoryModelLoadRequest(model_name=MODEL))
        assert err.code() == CODE.FAILED_PRECONDITION
        assert "failed to load 'resnext_mini': corrupt or truncated model file" in err.details()
        assert "still serving resnext_mini:1" in err.details()
        answer = stub.ModelInfer(infer_request())
        assert answer.model_version == "1"
        np.testing.assert_allclose(logits_of(answer), want[MODEL], rtol=1e-5, atol=1e-5)
        # Fixed: the load goes through and the newest version serves.
        shutil.copyfile(onnx_of(exported, OTHER), root / MODEL / "2" / "model.onnx")
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL))
        answer = stub.ModelInfer(infer_request())
        assert answer.model_version == "2"
        np.testing.assert_allclose(logits_of(answer), want[OTHER], rtol=1e-5, atol=1e-5)

        stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=MODEL))
        assert not stub.ModelReady(kpb.ModelReadyRequest(name=MODEL)).ready
        assert health_of(health, MODEL) == health_pb2.HealthCheckResponse.NOT_SERVING
        err = call_error(stub.ModelInfer, infer_request())
        assert err.code() == CODE.NOT_FOUND and "Request for unknown model: 'resnext_mini' is not found" in \
            err.details()
        stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=MODEL))  # again: no error

        err = call_error(stub.RepositoryModelLoad, kpb.RepositoryModelLoadRequest(model_name="nope"))
        assert err.code() == CODE.NOT_FOUND and "Request for unknown model: 'nope' is not found" in err.details()
        request = kpb.RepositoryModelLoadRequest(model_name=MODEL)
        request.parameters["config"].string_param = "{}"
        err = call_error(stub.RepositoryModelLoad, request)
        assert err.code() == CODE.INVALID_ARGUMENT and "'config'" in err.details()
        err = call_error(stub.RepositoryIndex, kpb.RepositoryIndexRequest(repository_name="other"))
        assert err.code() == CODE.NOT_FOUND


def test_load_and_unload_refused_without_explicit_mode(repo, channel):
    with running(repo) as (_, port):
        stub, _ = channel(port)
        for call, request in ((stub.RepositoryModelLoad, kpb.RepositoryModelLoadRequest(model_name=MODEL)),
                              (stub.RepositoryModelUnload, kpb.RepositoryModelUnloadRequest(model_name=MODEL))):
            err = call_error(call, request)
            assert err.code() == CODE.UNAVAILABLE and "--model-control-mode none" in err.details()
        assert stub.ModelReady(kpb.ModelReadyRequest(name=MODEL)).ready
        index = stub.RepositoryIndex(kpb.RepositoryIndexRequest()).models
        assert [(m.name, m.version, m.state) for m in index] == [(OTHER, "1", "READY"), (MODEL, "1", "READY")]


@pytest.mark.parametrize("policy, served", [
    ("", [3]), ("version_policy { all { } }", [1, 2, 3]), ("version_policy { latest { num_versions: 2 } }", [2, 3]),
    ("version_policy { specific { versions: [1, 3] } }", [1, 3])])
def test_version_policy_decides_which_versions_serve(root, exported, channel, policy, served):
    for v in (2, 3):
        add_version(root, v, onnx_of(exported, MODEL))
    (root / MODEL / "config.pbtxt").write_text(f'name: "{MODEL}"\nplatform: "onnxruntime_onnx"\n{policy}\n')
    repo = load_repository(str(root), providers="cpu", threads=1, models=[OTHER], empty_ok=True)
    with running(repo, model_control="explicit") as (_, port):
        stub, _ = channel(port)
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL))
        meta = stub.ModelMetadata(kpb.ModelMetadataRequest(name=MODEL))
        assert list(meta.versions) == [str(v) for v in served]
        for v in (1, 2, 3):
            assert stub.ModelReady(kpb.ModelReadyRequest(name=MODEL, version=str(v))).ready == (v in served)
    # The same policy at start, without model control.
    repo = load_repository(str(root), providers="cpu", threads=1)
    assert sorted(repo.models[MODEL]) == served


# --------------------------------------------------------------------------- poll


def test_poll_follows_the_repository(root, exported, want, channel):
    repo = load_repository(str(root), providers="cpu", threads=1)
    with running(repo, model_control="poll", poll_secs=0.1) as (server, port):
        stub, health = channel(port)
        add_version(root, 2, onnx_of(exported, OTHER))
        wait_for(lambda: list(stub.ModelMetadata(kpb.ModelMetadataRequest(name=MODEL)).versions) == ["2"],
                 "version 2 to replace version 1")
        np.testing.assert_allclose(logits_of(stub.ModelInfer(infer_request())), want[OTHER], rtol=1e-5, atol=1e-5)
        # model.onnx replaced in place (a new file renamed over it): reloaded under the same version.
        tmp = root / MODEL / "2" / "model.onnx.tmp"
        shutil.copyfile(onnx_of(exported, MODEL), tmp)
        os.replace(tmp, root / MODEL / "2" / "model.onnx")
        wait_for(lambda: np.allclose(logits_of(stub.ModelInfer(infer_request())), want[MODEL], rtol=1e-5,
                                     atol=1e-5), "the replaced model.onnx to serve")
        # A corrupt new version: logged, not served; version 2 goes on.
        os.makedirs(root / MODEL / "3")
        (root / MODEL / "3" / "model.onnx").write_bytes(b"garbage")
        wait_for(lambda: "corrupt" in server.core.models.failures.get(MODEL, ""), "the failed load of version 3")
        time.sleep(0.5)  # a few polls; nothing may change
        assert stub.ModelInfer(infer_request()).model_version == "2"
        shutil.rmtree(root / MODEL / "3")
        shutil.rmtree(root / OTHER)
        wait_for(lambda: not stub.ModelReady(kpb.ModelReadyRequest(name=OTHER)).ready, "densenet_mini to unload")
        assert health_of(health, OTHER) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert stub.ModelInfer(infer_request()).model_version == "2"


def test_a_request_that_looked_up_the_old_version_finishes_on_it(root, exported, want):
    """The moment between a request's lookup and its queueing: a reload in it must not fail it."""
    repo = load_repository(str(root), providers="cpu", threads=1, models=[MODEL])
    with running(repo, model_control="explicit") as (server, _):
        core = server.core
        old = core.resolve(MODEL)
        add_version(root, 2, onnx_of(exported, OTHER))
        core.models.request_load(MODEL)
        assert core.resolve(MODEL).version == 2
        np.testing.assert_allclose(core.run(old, X, None).logits, want[MODEL], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(core.run(core.resolve(MODEL), X, None).logits, want[OTHER], rtol=1e-5, atol=1e-5)


def _figures(stub, metrics) -> tuple[tuple[int, int, int], dict[str, float]]:
    """Version 1's (inference, execution, success) counts over ModelStatistics, and MODEL's FLOPs
    series by version."""
    (s,) = stub.ModelStatistics(kpb.ModelStatisticsRequest(name=MODEL, version="1"), timeout=WAIT_S).model_stats
    flops = {sample.labels["version"]: sample.value for m in metrics.registry.collect()
             if m.name == "zoo_serve_model_flops" for sample in m.samples if sample.labels["model"] == MODEL}
    return (s.inference_count, s.execution_count, s.inference_stats.success.count), flops


def test_a_version_reloaded_within_the_retire_delay_starts_its_statistics_over(root, exported, channel, monkeypatch):
    """Triton keeps statistics per loaded model instance: unload and load again, and the version
    counts from zero, however soon. Neither the old instance's figures, nor a request still
    finishing on it, nor its retirement later may touch the new instance's."""
    monkeypatch.setattr(serve.model_control, "RETIRE_AFTER_S", 0.5)
    repo = load_repository(str(root), providers="cpu", threads=1, models=[MODEL])
    flops = float(repo.get(MODEL).meta["flops"])
    with running(repo, model_control="explicit") as (server, port):
        core, (stub, _) = server.core, channel(port)
        for _ in range(2):
            stub.ModelInfer(infer_request(X[:1]), timeout=WAIT_S)
        assert _figures(stub, core.metrics) == ((2, 2, 2), {"1": flops})
        old = core.resolve(MODEL)
        stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=WAIT_S)
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL), timeout=WAIT_S)
        assert core.resolve(MODEL) is not old  # a fresh instance, while the old one's batcher still retires
        assert _figures(stub, core.metrics) == ((0, 0, 0), {"1": flops})
        core.run(old, X[:1], None)  # looked up before the unload: answered by the old instance
        assert _figures(stub, core.metrics) == ((0, 0, 0), {"1": flops})
        stub.ModelInfer(infer_request(X[:1]), timeout=WAIT_S)
        wait_for(lambda: len(core.models._own) == len(core.repo.all()), "the old instance to retire")
        assert _figures(stub, core.metrics) == ((1, 1, 1), {"1": flops})


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_hot_reload_under_load(root, exported, want, channel, monkeypatch):
    """Clients classify without pause while a new version is copied in and the old one removed,
    ten times: no request fails, the answers follow the versions, nothing is kept per reload."""
    monkeypatch.setattr(serve.model_control, "RETIRE_AFTER_S", 0.3)
    repo = load_repository(str(root), providers="cpu", threads=1, models=[MODEL])
    # Odd versions answer as resnext_mini (version 1 is), even ones as densenet_mini: each reload switches.
    sources = {1: onnx_of(exported, MODEL), 0: onnx_of(exported, OTHER)}
    stop, failures, seen = threading.Event(), [], []
    with running(repo, model_control="poll", poll_secs=0.05) as (server, port):
        stub, _ = channel(port)

        def client() -> None:
            while not stop.is_set():
                try:
                    answer = stub.ModelInfer(infer_request(), timeout=WAIT_S)
                except grpc.RpcError as e:
                    failures.append(f"{e.code()}: {e.details()}")
                    continue
                version = int(answer.model_version)
                expected = want[MODEL] if version % 2 == 1 else want[OTHER]
                if not np.allclose(logits_of(answer), expected, rtol=1e-5, atol=1e-5):
                    failures.append(f"version {version} answered another model's logits")
                seen.append(version)

        clients = [threading.Thread(target=client) for _ in range(3)]
        for t in clients:
            t.start()
        rss = []
        try:
            for version in range(2, 12):
                shutil.copytree(root / MODEL / str(version - 1), root / MODEL / f".{version}")  # then one rename:
                shutil.copyfile(sources[version % 2], root / MODEL / f".{version}" / "model.onnx")
                os.rename(root / MODEL / f".{version}", root / MODEL / str(version))
                count = len(seen)
                wait_for(lambda: any(v == version for v in seen[count:]), f"answers from version {version}")
                shutil.rmtree(root / MODEL / str(version - 1))
                rss.append(rss_bytes())
        finally:
            stop.set()
            for t in clients:
                t.join(WAIT_S)
        core = server.core
        # Every retired version's batcher closes and lets its session go: only the served one is held.
        wait_for(lambda: len(core.models._own) == len(core.repo.all()), "retired versions to be released")
        assert sorted(core.models.batchers) == [(OTHER, 1), (MODEL, 11)]  # the poll found densenet_mini too
        # Statistics and the FLOPs series of the unloaded versions are gone with them.
        assert set(core.statistics.held()) <= {(OTHER, 1), (MODEL, 11)}, core.statistics.held()
        flops = {s.labels["version"] for m in core.metrics.registry.collect() if m.name == "zoo_serve_model_flops"
                 for s in m.samples if s.labels["model"] == MODEL}
        assert flops == {"11"}, flops
    assert not failures, failures[:5]
    assert set(range(2, 12)) <= set(seen)
    # Loose on purpose: the allocator keeps freed arenas, so RSS is not a count of live sessions.
    # What must not happen is growth by a session per reload for good; the counts above check
    # that exactly, this only that nothing else piles up far beyond the first reloads' level.
    assert rss[-1] - rss[1] < 150 * 2**20, [r // 2**20 for r in rss]


# --------------------------------------------------------------------------- onnxruntime's threads


def _spinning(model) -> str:
    return model.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


@pytest.mark.parametrize("spinning", [False, True])
def test_intra_op_threads_spin_only_when_asked_at_start_and_at_every_reload(root, exported, spinning):
    """Off by default (``--ort-spinning`` turns it on): an idle spinning thread takes the core the
    gRPC threads need on a small machine. A version loaded later gets the same setting."""
    repo = load_repository(str(root), providers="cpu", threads=2, models=[MODEL], spinning=spinning)
    want = "1" if spinning else "0"
    assert _spinning(repo.get(MODEL)) == want
    with running(repo, model_control="explicit") as (server, _):
        add_version(root, 2, onnx_of(exported, MODEL))
        server.core.models.load(MODEL)
        assert server.core.repo.get(MODEL).version == 2
        assert _spinning(server.core.repo.get(MODEL)) == want


# --------------------------------------------------------------------------- warmup


class RecordingSession:
    """onnxruntime's session, recording the batch size of each run."""

    def __init__(self, session):
        self.session, self.sizes = session, []

    def run(self, outputs, feeds):
        self.sizes.append(len(feeds["input"]))
        return self.session.run(outputs, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_warmup_runs_batch_1_and_the_limit_before_serving(exported):
    repo = load_repository(exported.root, providers="cpu", threads=1, models=[MODEL])
    model = repo.get(MODEL)
    model.session = RecordingSession(model.session)
    server, _ = serve.server.create_server(repo, "127.0.0.1:0", max_batch=6)
    try:
        assert sorted(model.session.sizes) == [1, 6]  # before the server ever started
    finally:
        server.grpc_server.stop(None)
        server.core.models.close()


def test_config_model_warmup_samples_are_run(root, channel):
    (root / MODEL / "config.pbtxt").write_text(
        f'name: "{MODEL}"\nmax_batch_size: 4\n'
        'model_warmup [{ name: "r" batch_size: 3 count: 2 inputs { key: "input" value: '
        '{ data_type: TYPE_FP32 dims: [3, 32, 32] random_data: true } } }]\n')
    repo = load_repository(str(root), providers="cpu", threads=1, models=[MODEL])
    model = repo.get(MODEL)
    model.session = RecordingSession(model.session)
    with running(repo):
        assert model.session.sizes == [3, 3]
    # A sample that cannot run fails the load; in explicit mode the served version stays.
    (root / MODEL / "config.pbtxt").write_text(
        f'name: "{MODEL}"\nmodel_warmup [{{ name: "f" batch_size: 1 inputs {{ key: "input" value: '
        '{ data_type: TYPE_FP32 dims: [3, 32, 32] input_data_file: "missing.bin" } } }]\n')
    repo = load_repository(str(root), providers="cpu", threads=1, empty_ok=True)
    with running(repo, model_control="explicit") as (_, port):
        stub, _ = channel(port)
        err = call_error(stub.RepositoryModelLoad, kpb.RepositoryModelLoadRequest(model_name=MODEL))
        assert err.code() == CODE.FAILED_PRECONDITION
        assert "model_warmup 'f': cannot read" in err.details() and "missing.bin" in err.details()
        assert not stub.ModelReady(kpb.ModelReadyRequest(name=MODEL)).ready


MISSING_SAMPLE = (f'name: "{MODEL}"\nmodel_warmup [{{ name: "f" batch_size: 1 inputs {{ key: "input" value: '
                  '{ data_type: TYPE_FP32 dims: [3, 32, 32] input_data_file: "missing.bin" } } }]\n')


@pytest.fixture
def session_runs(monkeypatch):
    """The batch size of every onnxruntime session run in this process from now on (sessions built
    by serve.runtime are onnxruntime's own, recording each run)."""
    import serve.runtime

    sizes: list[int] = []

    class Recording(serve.runtime.ort.InferenceSession):
        def run(self, output_names, input_feed, run_options=None):
            sizes.append(len(input_feed["input"]))
            return super().run(output_names, input_feed, run_options)

    monkeypatch.setattr(serve.runtime.ort, "InferenceSession", Recording)
    return sizes


def test_no_warmup_leaves_the_model_unrun_until_the_first_request(exported, want, channel, session_runs):
    repo = load_repository(exported.root, providers="cpu", threads=1, models=[MODEL], warmup=False)
    with running(repo, max_batch=6) as (server, port):
        stub, _ = channel(port)
        assert stub.ModelReady(kpb.ModelReadyRequest(name=MODEL), timeout=WAIT_S).ready
        assert session_runs == [] and server.core.models.warmed == 0
        got = logits_of(stub.ModelInfer(infer_request(), timeout=WAIT_S))
        np.testing.assert_allclose(got, want[MODEL], rtol=1e-4, atol=1e-5)
        assert sum(session_runs) == len(X)  # the request's rows were its first runs
    # The same with warmup: batch 1 when the file is read, then batch 1 and the limit.
    session_runs.clear()
    with running(load_repository(exported.root, providers="cpu", threads=1, models=[MODEL]), max_batch=6):
        assert session_runs == [1, 1, 6]


def test_no_warmup_holds_for_versions_loaded_later(root, want, channel, session_runs):
    # The sample cannot be read: only a load that skips the warmup succeeds.
    (root / MODEL / "config.pbtxt").write_text(MISSING_SAMPLE)
    repo = load_repository(str(root), providers="cpu", threads=1, empty_ok=True, warmup=False)
    with running(repo, model_control="explicit") as (server, port):
        stub, _ = channel(port)
        stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL), timeout=WAIT_S)
        assert stub.ModelReady(kpb.ModelReadyRequest(name=MODEL), timeout=WAIT_S).ready
        assert session_runs == [] and server.core.models.warmed == 0
        np.testing.assert_allclose(logits_of(stub.ModelInfer(infer_request(), timeout=WAIT_S)), want[MODEL],
                                   rtol=1e-4, atol=1e-5)


def test_no_warmup_still_refuses_a_class_dimension_its_labels_disagree_with(root, session_runs):
    """The graph declares its class dimension (static in every zoo export): comparing it with the
    labels needs no run, so ``--no-warmup`` refuses the model as the warmup does, in the same words."""
    import onnx

    from contract.repository import labels_text
    from serve.runtime import RepositoryError

    path = root / MODEL / "1" / "model.onnx"
    m = onnx.load(str(path))
    (prop,) = [p for p in m.metadata_props if p.key == "zoo.labels"]
    declared = len(json.loads(prop.value))
    labels = [f"class {i}" for i in range(declared + 1)]
    prop.value = json.dumps(labels)
    onnx.save(m, str(path))
    (root / MODEL / "labels.txt").write_text(labels_text(labels))
    errors = {}
    for warmup in (True, False):
        session_runs.clear()
        with pytest.raises(RepositoryError) as info:
            load_repository(str(root), providers="cpu", threads=1, models=[MODEL], warmup=warmup)
        errors[warmup] = str(info.value)
        if not warmup:
            assert session_runs == []
    assert errors[False] == errors[True] == (f"model file {path}: graph output ['batch', {declared}] does not fit "
                                               f"{declared + 1} labels")
    refused = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(root), "--model", MODEL, "--port", "0",
                              "--no-http", "--providers", "cpu", "--threads", "1", "--no-warmup"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=WAIT_S)
    assert refused.returncode == 1 and errors[True] in refused.stderr and "Traceback" not in refused.stderr


def test_cli_no_warmup_serves_what_the_warmup_would_refuse(root, want):
    """``python -m serve --no-warmup``: the model is ready without having run (a warmup sample that
    cannot be read stops the start without the flag, not with it), and the ready line says so."""
    from tests.serve.test_cli import start_serve
    (root / MODEL / "config.pbtxt").write_text(MISSING_SAMPLE)
    argv = ["--model-dir", str(root), "--model", MODEL, "--port", "0", "--no-http", "--providers", "cpu",
            "--threads", "1"]
    refused = subprocess.run([sys.executable, "-m", "serve", *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=WAIT_S)
    assert refused.returncode == 1 and "model_warmup 'f': cannot read" in refused.stderr
    proc, port, line = start_serve(*argv, "--no-warmup")
    try:
        assert "; no warmup" in line and "warmed up" not in line
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            np.testing.assert_allclose(logits_of(stub.ModelInfer(infer_request(), timeout=WAIT_S)), want[MODEL],
                                       rtol=1e-4, atol=1e-5)
    finally:
        proc.terminate()
        assert proc.wait(WAIT_S) == 0


# --------------------------------------------------------------------------- CLI and a stock client


@pytest.mark.parametrize("argv, message", [
    (["--load-model", MODEL], "--load-model needs --model-control-mode explicit"),
    (["--model-control-mode", "poll", "--repository-poll-secs", "0"], "Invalid --repository-poll-secs: 0.0"),
    (["--model-control-mode", "sometimes"], "invalid choice: 'sometimes'"),
    (["--model-control-mode", "explicit", "--load-model", "*", "--load-model", MODEL],
     "--load-model '*' loads every model: it goes without other --load-model or --model"),
    (["--model-control-mode", "poll", "--model", MODEL], "--model does not go with --model-control-mode poll"),
    (["--instances", "0"], "Invalid --instances: 0 (at least 1)"),
])
def test_cli_flags_refused_with_one_line(exported, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        serve_main.main(["--model-dir", exported.root, "--port", "0", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err


def test_cli_explicit_mode_starts_with_the_named_models(exported):
    """``python -m serve --model-control-mode explicit --load-model NAME``: only that one, then loads on request."""
    from tests.serve.test_cli import start_serve
    proc, port, line = start_serve("--model-dir", exported.root, "--port", "0", "--no-http", "--providers", "cpu",
                                   "--threads", "1", "--model-control-mode", "explicit", "--load-model", OTHER)
    try:
        assert f"models {OTHER}:1" in line and "model control explicit" in line and "; warmed up in " in line
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            assert not stub.ModelReady(kpb.ModelReadyRequest(name=MODEL), timeout=WAIT_S).ready
            stub.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=MODEL), timeout=WAIT_S)
            assert stub.ModelReady(kpb.ModelReadyRequest(name=MODEL), timeout=WAIT_S).ready
    finally:
        proc.terminate()
        assert proc.wait(WAIT_S) == 0


def test_cli_explicit_mode_load_model_star_loads_every_model_and_stays_explicit(exported):
    """Triton's ``--load-model=*``: everything in the repository at start, unloadable on request."""
    from tests.serve.test_cli import start_serve
    proc, port, line = start_serve("--model-dir", exported.root, "--port", "0", "--no-http", "--providers", "cpu",
                                   "--threads", "1", "--model-control-mode", "explicit", "--load-model", "*")
    try:
        assert MODEL in line and OTHER in line and "model control explicit" in line, line
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            assert all(stub.ModelReady(kpb.ModelReadyRequest(name=m), timeout=WAIT_S).ready for m in (MODEL, OTHER))
            stub.RepositoryModelUnload(kpb.RepositoryModelUnloadRequest(model_name=OTHER), timeout=WAIT_S)
            assert not stub.ModelReady(kpb.ModelReadyRequest(name=OTHER), timeout=WAIT_S).ready
    finally:
        proc.terminate()
        assert proc.wait(WAIT_S) == 0


TRITON_CLIENT = r"""
import json, sys
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

client = tg.InferenceServerClient(sys.argv[1])
model = sys.argv[2]
out = {"index": [[m["name"], m.get("version", ""), m.get("state", "")]
                 for m in client.get_model_repository_index(as_json=True)["models"]]}
out["before"] = client.is_model_ready(model)
client.load_model(model)
out["loaded"] = client.is_model_ready(model)
client.unload_model(model)
out["unloaded"] = client.is_model_ready(model)
try:
    client.load_model("wrong_model_name")
except InferenceServerException as e:
    out["wrong"] = e.message()
print(json.dumps(out))
"""


def test_stock_tritonclient_model_control(root):
    """What simple_grpc_model_control.py does, on this repository."""
    if importlib.util.find_spec("tritonclient") is None:  # importing it here would clash with serve's messages
        pytest.skip("tritonclient is not installed (it is in the dev extra)")
    repo = load_repository(str(root), providers="cpu", threads=1, models=[OTHER], empty_ok=True)
    with running(repo, model_control="explicit") as (_, port):
        result = subprocess.run([sys.executable, "-c", TRITON_CLIENT, f"127.0.0.1:{port}", MODEL],
                                capture_output=True, text=True, timeout=120)  # only a hang reaches it
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["index"] == [[OTHER, "1", "READY"], [MODEL, "", "UNAVAILABLE"]]
    assert (out["before"], out["loaded"], out["unloaded"]) == (False, True, False)
    assert "Request for unknown model: 'wrong_model_name' is not found" in out["wrong"]


# ------------------------------------------------------------------ instance_group: sessions run at once


@pytest.mark.parametrize("group,default,count", [
    ("", 1, 1), ("", 2, 2),  # no instance_group: --instances
    ("instance_group [{ kind: KIND_CPU count: 3 }]", 1, 3),
    ("instance_group [{ kind: KIND_CPU }, { kind: KIND_CPU count: 1 }]", 1, 3),  # Triton: a CPU group has 2
])
def test_instance_group_count_is_the_sessions_each_warmed_and_serving(root, channel, group, default, count):
    (root / MODEL / "config.pbtxt").write_text(f'name: "{MODEL}"\nmax_batch_size: 4\n{group}\n')
    repo = load_repository(str(root), providers="cpu", threads=1, models=[MODEL], instances=default)
    model = repo.get(MODEL)
    assert len(model.sessions) == count and len({id(s) for s in model.sessions}) == count
    model.sessions[:] = [RecordingSession(s) for s in model.sessions]
    with running(repo, max_batch=4) as (server, port):
        assert [sorted(s.sizes) for s in model.sessions] == [[1, 4]] * count  # Triton warms every instance
        assert server.core.models.batcher_of(model).instances == count
        stub, _ = channel(port)
        config = stub.ModelConfig(kpb.ModelConfigRequest(name=MODEL)).config
        assert sum(g.count for g in config.instance_group) == count
        answers = [None] * 8

        def ask(i):
            answers[i] = logits_of(stub.ModelInfer(infer_request(X[i % 2:i % 2 + 1]), timeout=WAIT_S))
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S)
    want = repo.get(MODEL).run(X)
    for i, got in enumerate(answers):
        np.testing.assert_allclose(got[0], want[i % 2], rtol=1e-4, atol=1e-5)
    assert sum(len(s.sizes) for s in model.sessions) > 2 * count  # the requests ran on the sessions


def test_cli_instances_reach_the_models(exported):
    from tests.serve.test_cli import start_serve
    proc, port, _ = start_serve("--model-dir", exported.root, "--model", MODEL, "--port", "0", "--no-http",
                                "--providers", "cpu", "--threads", "1", "--instances", "2")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kpb_grpc.GRPCInferenceServiceStub(channel)
            (group,) = stub.ModelConfig(kpb.ModelConfigRequest(name=MODEL), timeout=WAIT_S).config.instance_group
            assert group.count == 2 and group.kind == group.KIND_CPU
    finally:
        proc.terminate()
        assert proc.wait(WAIT_S) == 0
