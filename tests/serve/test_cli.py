"""python -m serve and python -m serve.client: start-up, failures, SIGTERM drain, the client CLI,
and the rule that serving never imports torch or zoo."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import serve.__main__ as serve_main
import serve.client as client
from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.ready import parse_ready_line
from serve.runtime import RepositoryError, load_repository
from tests.serve.conftest import INPUT_SIZE, REPO_ROOT, png_bytes, random_image, running, tensor_request

def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = serve_main.main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def start_serve(*argv: str) -> tuple[subprocess.Popen, int, str]:
    """``python -m serve ARGV`` in a subprocess, after its ready line: (process, port, line)."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    ready = parse_ready_line(line)
    if ready is None:
        proc.kill()
        raise AssertionError(f"no ready line: {line!r} {proc.stderr.read()}")
    return proc, ready.port, line


def test_serving_never_imports_torch_or_zoo():
    code = ("import sys, serve, serve.server, serve.runtime, serve.batching, serve.preprocess, serve.metrics, "
            "serve.client, serve.__main__\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'zoo'))\n"
            "print(bad)\nsys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- a real process


def test_sigterm_drains_in_flight_requests_and_exits_0(exported):
    proc, port, line = start_serve("--model-dir", exported.root, "--port", "0", "--threads", "1",
                                   "--metrics-port", "0", "--grace", "20", "--drain-delay", "3")
    try:
        # Which version and precision each model serves: after several exports the newest is served.
        assert "models densenet_mini:1 fp32, resnext_mini:1 fp32;" in line and "CPUExecutionProvider" in line
        assert "metrics http://127.0.0.1:" in line
        x = np.zeros(INPUT_SIZE, np.float32)
        resume = threading.Event()

        def requests():  # half before SIGTERM, half after the server began stopping
            for i in range(20):
                if i == 10:
                    assert resume.wait(30)
                yield tensor_request(x, model="resnext_mini", request_id=str(i))

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            stream = stub.ClassifyStream(requests(), timeout=60)
            answers = [next(stream) for _ in range(10)]
            proc.send_signal(signal.SIGTERM)
            assert proc.stdout.readline().startswith("python -m serve: draining: health NOT_SERVING")
            # the drain window: health tells balancers to go elsewhere, calls are still answered
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            ready = kpb_grpc.GRPCInferenceServiceStub(channel).ServerReady(kpb.ServerReadyRequest(), timeout=10)
            assert not ready.ready
            assert stub.Classify(tensor_request(x, model="resnext_mini"), timeout=10).classes
            assert "stopping" in proc.stdout.readline()
            # then new calls are refused: a new connection (not the one the stream holds) is not accepted
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as fresh:
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.ClassifierStub(fresh).Classify(tensor_request(x, model="resnext_mini"), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            resume.set()  # ... while the in-flight stream still gets every answer
            answers += list(stream)
        assert [a.request_id for a in answers] == [str(i) for i in range(20)]
        assert all(a.WhichOneof("result") == "response" for a in answers)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_second_signal_stops_at_once(exported):
    """Drain and grace an hour each; a second SIGTERM cancels the call in flight and exits 0 at
    once. The waits below are bounds only a process that ignored the second signal would reach."""
    proc, port, _ = start_serve("--model-dir", exported.root, "--port", "0", "--threads", "1",
                                "--grace", "3600", "--drain-delay", "3600")
    try:
        x = np.zeros(INPUT_SIZE, np.float32)
        hold = threading.Event()

        def requests():
            yield tensor_request(x, model="resnext_mini", request_id="0")
            hold.wait(600)  # the stream stays open: a call in flight

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = pb_grpc.ClassifierStub(channel).ClassifyStream(requests(), timeout=600)
            assert next(stream).request_id == "0"
            proc.send_signal(signal.SIGTERM)
            assert "draining" in proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
            with pytest.raises(grpc.RpcError) as info:
                next(stream)
            assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            hold.set()
        assert "a second signal cancelled the calls still in flight" in proc.stdout.read()
    finally:
        hold.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_corrupt_model_file_stops_start_with_exit_1(copy_repo):
    path = copy_repo / "resnext_mini" / "1" / "model.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    result = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(copy_repo), "--port", "0"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "corrupt or truncated" in lines[0], result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------- start-up failures in-process


def test_garbage_and_missing_model_files(capsys, copy_repo):
    bad = copy_repo / "densenet_mini" / "1" / "model.onnx"
    bad.write_bytes(b"this is not an onnx file")
    code, out, err = run_main(capsys, "--model-dir", str(copy_repo), "--port", "0")
    assert code == 1 and str(bad) in err and "corrupt or truncated" in err and len(err.strip().splitlines()) == 1
    bad.unlink()  # a version directory without its file
    code, out, err = run_main(capsys, "--model-dir", str(copy_repo), "--port", "0")
    assert code == 1 and f"missing model file {bad}" in err
    bad.write_bytes(b"")
    code, out, err = run_main(capsys, "--model-dir", str(copy_repo), "--port", "0")
    assert code == 1 and f"model file {bad} is empty" in err


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_providers_cuda_without_gpu(capsys, exported):
    code, out, err = run_main(capsys, "--model-dir", exported.root, "--port", "0", "--providers", "cuda")
    assert code == 1 and "--providers cuda" in err and "CUDAExecutionProvider" in err and "onnxruntime-gpu" in err
    assert len(err.strip().splitlines()) == 1
    # This environment has the CPU build: installing the gpu extra beside it would shadow one with the other.
    assert "pip uninstall onnxruntime && pip install -e '.[gpu]'" in err


def test_a_taken_metrics_port_is_named(capsys, exported):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_main(capsys, "--model-dir", exported.root, "--port", "0", "--metrics-port", str(port))
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert f"cannot serve metrics on 127.0.0.1:{port} (--metrics-port)" in err and "Errno" not in err


@pytest.mark.parametrize("argv,code,message", [
    (["--model-dir", "/nonexistent/models"], 1, "no such directory"),
    (["--max-batch", "0"], 2, "Invalid --max-batch: 0"),
    (["--port", "-1"], 2, "Invalid --port: -1"),
    (["--drain-delay", "-1"], 2, "Invalid --drain-delay: -1"),
    (["--grace", "inf"], 2, "Invalid --grace: inf"),
    (["--drain-delay", "nan"], 2, "Invalid --drain-delay: nan"),
    (["--tls-cert", "cert.pem"], 2, "--tls-cert and --tls-key go together"),
    (["--auth-token-file", "/nonexistent/token"], 2, "--auth-token-file /nonexistent/token"),
    (["--default-model", "nope"], 1, "default model 'nope' is not served"),
    (["--model", "nope"], 1, "--model nope: no directory"),
    (["--model", "resnext_mini:x"], 1, "invalid --model 'resnext_mini:x'"),
    (["--providers", "tpu"], 2, "invalid choice: 'tpu'"),
])
def test_bad_options(capsys, exported, argv, code, message):
    if "--model-dir" not in argv:
        argv = ["--model-dir", exported.root, "--port", "0", *argv]
    got, out, err = run_main(capsys, *argv)
    assert got == code and message in err and "Traceback" not in err


def test_empty_repository(capsys, tmp_path):
    code, _, err = run_main(capsys, "--model-dir", str(tmp_path), "--port", "0")
    assert code == 1 and "no models" in err


def test_port_in_use(capsys, repo, exported):
    with running(repo) as (_, port):
        code, _, err = run_main(capsys, "--model-dir", exported.root, "--port", str(port))
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in err


def test_port_in_use_is_one_line_on_stderr(exported):
    """The whole stderr of the process, gRPC's own C-core logging included."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "serve", "--model-dir", exported.root, "--port", str(port)],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"python -m serve: error: cannot listen on 127.0.0.1:{port}: the port is taken or the host is not an "
        "address of this machine"], result.stderr


def test_versions_newest_by_default_or_pinned(copy_repo):
    shutil.copytree(copy_repo / "resnext_mini" / "1", copy_repo / "resnext_mini" / "3")
    (copy_repo / "resnext_mini" / "tmp-in-progress").mkdir()  # not a version: ignored
    assert {(m.name, m.version) for m in load_repository(str(copy_repo), "cpu", 1).all()} == {
        ("densenet_mini", 1), ("resnext_mini", 3)}
    repo = load_repository(str(copy_repo), "cpu", 1, models=["resnext_mini:1", "resnext_mini:3"])
    assert [(m.name, m.version) for m in repo.all()] == [("resnext_mini", 1), ("resnext_mini", 3)]
    with running(repo) as (_, port), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ClassifierStub(channel)
        x = tensor_request(np.zeros(INPUT_SIZE, np.float32))
        assert stub.Classify(x).version == 3  # the only name is the default; its newest version
        x.version = 1
        assert stub.Classify(x).version == 1
    with pytest.raises(RepositoryError, match="missing model file .*resnext_mini/2/model.onnx"):
        load_repository(str(copy_repo), "cpu", 1, models=["resnext_mini:2"])


# --------------------------------------------------------------------------- the client


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    paths = []
    for i, fmt in enumerate(("PNG", "JPEG", "BMP", "WEBP")):
        p = d / f"img{i}.{fmt.lower()}"
        p.write_bytes(png_bytes(random_image(i), fmt))
        paths.append(str(p))
    junk = d / "junk.png"
    junk.write_bytes(b"not an image")
    return paths, str(junk)


def test_client_cli(capsys, server, images):
    paths, junk = images
    target = f"127.0.0.1:{server[1]}"
    code = client.main([paths[0], "--server", target, "--model", "resnext_mini", "--top-k", "3"])
    out = capsys.readouterr().out
    assert code == 0 and paths[0] in out and "resnext_mini v1" in out and "timing (us): decode" in out
    assert len(re.findall(r"^  digit\d\s+0\.\d{4}$", out, re.M)) == 3
    code = client.main([*paths, "--server", target, "--model", "densenet_mini"])  # pipelined over one stream
    out = capsys.readouterr().out
    assert code == 0 and all(p in out for p in paths) and len(re.findall(r"^  digit\d", out, re.M)) == 5 * len(paths)
    code = client.main([paths[0], junk, "--server", target, "--model", "densenet_mini"])
    captured = capsys.readouterr()
    assert code == 1 and paths[0] in captured.out and f"{junk}: error: INVALID_ARGUMENT" in captured.err


@pytest.mark.parametrize("make_argv,code,message", [
    (lambda p, t: [p, "--server", "127.0.0.1:1", "--timeout", "5"], 1, "server 127.0.0.1:1: UNAVAILABLE"),
    (lambda p, t: ["/nonexistent.jpg", "--server", t], 2, "cannot read /nonexistent.jpg"),
    (lambda p, t: [p, "--server", t, "--model", "nope"], 1,
     "NOT_FOUND: Request for unknown model: 'nope' is not found"),
])
def test_client_cli_errors(capsys, server, images, make_argv, code, message):
    got = client.main(make_argv(images[0][0], f"127.0.0.1:{server[1]}"))
    err = capsys.readouterr().err
    assert got == code and message in err and len(err.strip().splitlines()) == 1


def test_client_cli_names_a_single_bad_file(capsys, server, images):
    _, junk = images
    code = client.main([junk, "--server", f"127.0.0.1:{server[1]}", "--model", "resnext_mini"])
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert code == 1 and line.startswith(f"{junk}: error: INVALID_ARGUMENT: not a readable image"), err


def test_client_cli_plaintext_to_a_tls_server_hints_tls_ca(capsys, repo, images, tls_files):
    key, cert = (tls_files / "key.pem").read_bytes(), (tls_files / "cert.pem").read_bytes()
    with running(repo, tls=(key, cert)) as (_, port):
        for paths in ([images[0][0]], images[0][:2]):
            code = client.main([*paths, "--server", f"127.0.0.1:{port}", "--timeout", "10"])
            err = capsys.readouterr().err
            (line,) = err.strip().splitlines()
            assert code == 1 and line.startswith(f"python -m serve.client: error: server 127.0.0.1:{port}: UNAVAILABLE")
            assert line.endswith("(is the server using TLS? pass --tls-ca)"), line
        code = client.main([images[0][0], "--server", f"localhost:{port}", "--tls-ca", str(tls_files / "cert.pem"),
                            "--model", "resnext_mini"])
        assert code == 0 and images[0][0] in capsys.readouterr().out


def test_client_cli_image_over_the_server_limit(capsys, repo, images, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(np.random.default_rng(0).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)))
    paths, _ = images
    with running(repo, max_message_bytes=64 * 2**10) as (_, port):
        for argv in ([str(big)], [paths[0], str(big)]):
            code = client.main([*argv, "--server", f"127.0.0.1:{port}", "--model", "resnext_mini"])
            err = capsys.readouterr().err
            (line,) = err.strip().splitlines()
            assert code == 1 and f"{big}: " in line and "RESOURCE_EXHAUSTED" in line, line
            assert "python -m serve --max-message-mb" in line and "64.0 KiB" in line, line


def test_client_api(server, repo):
    with client.Classifier(f"127.0.0.1:{server[1]}") as c:
        x = np.random.default_rng(0).standard_normal(INPUT_SIZE).astype(np.float32)
        r = c.classify(x, model="resnext_mini", top_k=2, return_logits=True)
        want = repo.get("resnext_mini").session.run(["logits"], {"input": x[None]})[0][0]
        np.testing.assert_allclose(r.logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        assert len(r.classes) == 2 and r.top.score >= r.classes[1].score and r.provider == "CPUExecutionProvider"
        pixels = random_image(3)
        by_pixels = c.classify(pixels, model="resnext_mini")
        by_png = c.classify(png_bytes(pixels), model="resnext_mini")
        assert [p.index for p in by_pixels.classes] == [p.index for p in by_png.classes]
        many = c.classify_many([x, png_bytes(pixels), b"junk"], model="resnext_mini", raise_on_error=False)
        assert isinstance(many[0], client.Result) and isinstance(many[2], client.ClientError)
        assert many[2].code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(client.ClientError, match="INVALID_ARGUMENT"):
            c.classify_many([x, b"junk"], model="resnext_mini")
        assert [m.name for m in c.list_models().models] == ["densenet_mini", "resnext_mini"]
        assert c.latency_report("resnext_mini").models[0].count >= 1
