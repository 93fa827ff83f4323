"""Scale-out on one machine: replicas behind the client's round-robin balancer, and
``python -m serve --workers N`` sharing one port (SO_REUSEPORT)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Callable

import grpc
import numpy as np
import pytest

import serve.client as client
from serve._proto.inference import grpc_predict_v2_pb2 as kpb
from serve._proto.inference import grpc_predict_v2_pb2_grpc as kpb_grpc
from serve._proto.zoo.serving.v1 import classifier_pb2 as pb
from serve._proto.zoo.serving.v1 import classifier_pb2_grpc as pb_grpc
from serve.ready import parse_ready_line
from serve.__main__ import core_shares
from tests.serve.conftest import INPUT_SIZE, REPO_ROOT, png_bytes, random_image, running

MODEL = "resnext_mini"
def _poll(predicate, timeout: float = 60) -> bool:
    """Whether ``predicate()`` comes true within ``timeout`` seconds (a bound only a hang reaches)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)
    return True


def served(port: int) -> int:
    """Successful requests a server counted for MODEL, read over its own GetLatencyReport RPC."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        report = pb_grpc.ClassifierStub(channel).GetLatencyReport(pb.LatencyReportRequest(model=MODEL), timeout=10)
    return report.models[0].total_requests


# --------------------------------------------------------------------------- client-side balancing


def test_channel_target():
    assert client.channel_target("127.0.0.1:50051") == ("127.0.0.1:50051", [])
    rr = [client.ROUND_ROBIN]
    assert client.channel_target("127.0.0.1:1, 127.0.0.1:2") == ("ipv4:127.0.0.1:1,127.0.0.1:2", rr)
    assert client.channel_target("[::1]:1,[::1]:2") == ("ipv6:[::1]:1,[::1]:2", rr)
    assert client.channel_target("localhost:1,127.0.0.1:2")[0] == "ipv4:127.0.0.1:1,127.0.0.1:2"  # names resolved
    assert client.channel_target("dns:///serve.default.svc.cluster.local:50051") == (
        "dns:///serve.default.svc.cluster.local:50051", rr)
    for bad, message in (("127.0.0.1:1,nonsense", "expected HOST:PORT"),
                         ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
                         ("127.0.0.1:1,no-such-host.invalid:2", "cannot resolve 'no-such-host.invalid'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            client.channel_target(bad)


def test_round_robin_over_two_servers(repo):
    """A comma-separated target spreads calls over both replicas; each counts its own share."""
    x = np.zeros(INPUT_SIZE, np.float32)
    with running(repo) as (_, port_a), running(repo) as (_, port_b):
        with client.Classifier(f"127.0.0.1:{port_a},127.0.0.1:{port_b}") as c:
            for _ in range(20):
                assert c.classify(x, model=MODEL).model == MODEL
        a, b = served(port_a), served(port_b)
        assert a + b == 20 and a >= 1 and b >= 1, (a, b)  # round robin; pick-first would send all 20 to one


def test_round_robin_skips_a_draining_server(repo):
    """A server in its drain window (health NOT_SERVING, still answering) gets no new calls from a
    balancing client; the calls go to the replica that is SERVING."""
    x = np.zeros(INPUT_SIZE, np.float32)
    with running(repo) as (server_a, port_a), running(repo) as (_, port_b):
        with client.Classifier(f"127.0.0.1:{port_a},127.0.0.1:{port_b}") as c:
            for _ in range(10):
                c.classify(x, model=MODEL)
            a0, b0 = served(port_a), served(port_b)
            assert a0 >= 1 and b0 >= 1, (a0, b0)
            stopping = threading.Thread(target=server_a.stop, kwargs=dict(grace=5, drain_delay=3600.0))
            stopping.start()
            try:
                # The client hears of NOT_SERVING over its health Watch stream. Round robin
                # alternates while both are picked, so two calls in a row on B mean A is out.
                def both_on_b() -> bool:
                    a, b = served(port_a), served(port_b)
                    c.classify(x, model=MODEL)
                    c.classify(x, model=MODEL)
                    return (served(port_a), served(port_b)) == (a, b + 2)
                assert _poll(both_on_b), "the client kept sending calls to the draining server"
                a0, b0 = served(port_a), served(port_b)
                for _ in range(20):
                    assert c.classify(x, model=MODEL).model == MODEL
                a1, b1 = served(port_a), served(port_b)  # server A still answers this, while draining
            finally:
                server_a.begin_stop()  # a second call ends the drain
                stopping.join(30)
            assert not stopping.is_alive()
    assert (a1 - a0, b1 - b0) == (0, 20)


def test_client_cli_with_a_server_list(repo, tmp_path, capsys):
    image = tmp_path / "digit.png"
    image.write_bytes(png_bytes(random_image(3)))
    with running(repo) as (_, port_a), running(repo) as (_, port_b):
        servers = f"127.0.0.1:{port_a},localhost:{port_b}"
        assert client.main([str(image), str(image), "--server", servers, "--model", MODEL]) == 0
        assert served(port_a) + served(port_b) == 2
        with client.Classifier(f"dns:///localhost:{port_a}") as c:  # the form a headless Service name takes
            assert c.classify(np.zeros(INPUT_SIZE, np.float32), model=MODEL).model == MODEL
    assert capsys.readouterr().out.count("digit.png") == 2
    with pytest.raises(SystemExit) as info:
        client.main([str(image), "--server", "127.0.0.1:1,bogus"])
    assert info.value.code == 2 and "--server: invalid server address 'bogus'" in capsys.readouterr().err


# --------------------------------------------------------------------------- --workers


def start_workers(*argv: str, session: bool = False) -> tuple[subprocess.Popen, int, set[int], list[str]]:
    """``python -m serve ARGV`` until its workers-ready line: (process, port, worker pids, lines).
    ``session``: in a session of its own, as a shell starts a command (its group is its pid)."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=session)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        ready = parse_ready_line(line)
        if ready is not None and ready.workers > 1:
            return proc, ready.port, set(ready.pids), lines
    proc.kill()
    raise AssertionError(f"no ready line: {lines} {proc.stderr.read()}")


def stop_workers(proc: subprocess.Popen, *send: Callable[[], None], timeout: float = 60) -> str:
    """Each of ``send`` (the signals), then the parent's exit, 0 (killed if it never comes: only a
    hang reaches the timeout); returns its stdout."""
    try:
        for signal_it in send:
            signal_it()
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return out


def infer_pid(port: int) -> int:
    """ModelInfer over a fresh connection: the pid of the worker the kernel gave it to."""
    x = np.zeros((1, *INPUT_SIZE), np.float32)
    request = kpb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    # A local subchannel pool: otherwise grpc would reuse one process-wide connection per target.
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        response = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return response.parameters["server_pid"].int64_param


def classify_count(metrics_url: str) -> float:
    """Successful requests a worker counted, from its Prometheus /metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("zoo_serve_requests_total{") and 'code="OK"' in line)


def test_workers_share_one_port_and_stop_on_sigterm(exported):
    proc, port, pids, lines = start_workers("--model-dir", exported.root, "--model", MODEL, "--port", "0",
                                            "--workers", "2", "--metrics-port", "0", "--grace", "5")
    try:
        assert len(pids) == 2 and proc.pid not in pids
        worker_lines = [line for line in lines if line.startswith("[worker ")]
        assert len(worker_lines) == 2 and all(f"listening on 127.0.0.1:{port}" in line for line in worker_lines)
        seen = set()
        for _ in range(60):  # SO_REUSEPORT hashes each new connection to one worker
            seen.add(infer_pid(port))
            if seen == pids:
                break
        assert seen == pids
        # Classify clients in one process: by default their channels share one connection, so one
        # worker; with own_connection each has its own and the kernel spreads them over both
        metrics = [re.search(r"metrics (http://\S+/metrics)", line).group(1) for line in worker_lines]
        x = np.zeros(INPUT_SIZE, np.float32)
        for own, want_workers in ((False, 1), (True, 2)):
            before = [classify_count(url) for url in metrics]
            clients = [client.Classifier(f"127.0.0.1:{port}", own_connection=own) for _ in range(12)]
            for c in clients:
                c.classify(x, model=MODEL)
            for c in clients:
                c.close()
            grew = sum(classify_count(url) > b for url, b in zip(metrics, before))
            assert grew == want_workers, (own, before, [classify_count(url) for url in metrics])
        out = stop_workers(proc, lambda: proc.send_signal(signal.SIGTERM))
    finally:
        if proc.poll() is None:  # a check above failed
            proc.kill()
            proc.wait()
    assert out.count("python -m serve: stopped") == 3  # both workers, then the parent
    for pid in pids:  # the workers are gone, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize("pin", [True, False])
def test_each_worker_runs_on_cores_of_its_own(exported, pin):
    """--pin-workers (the default): every thread of worker I (gRPC's, onnxruntime's) runs on share I
    of the cores the parent may use, the shares disjoint; --no-pin-workers leaves them all to each."""
    proc, _, pids, lines = start_workers("--model-dir", exported.root, "--model", MODEL, "--port", "0",
                                         "--workers", "2", *([] if pin else ["--no-pin-workers"]))
    try:
        mine = os.sched_getaffinity(0)
        threads = {pid: {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}
                   for pid in pids}
        if pin:
            shares = sorted(map(sorted, core_shares(mine, 2)))
            assert all(len(held) == 1 for held in threads.values()), threads
            assert sorted(sorted(next(iter(held))) for held in threads.values()) == shares, threads
            assert f"cores {','.join(map(str, shares[0]))} | " in lines[-1] or len(mine) < 2
        else:
            assert all(held == {frozenset(mine)} for held in threads.values()), threads
            assert "cores" not in lines[-1]
    finally:
        stop_workers(proc, lambda: proc.send_signal(signal.SIGTERM))


@pytest.mark.parametrize("cores, n, want", [
    ([0, 1], 2, [[0], [1]]),
    ([3, 1, 2, 0], 2, [[0, 1], [2, 3]]),
    ([0, 1, 2, 3, 4], 2, [[0, 1, 2], [3, 4]]),
    ([0, 1, 2, 3, 4, 5, 6], 3, [[0, 1, 2], [3, 4], [5, 6]]),
    ([5], 3, [[5], [5], [5]]),
    ([0, 1], 3, [[0], [1], [0]]),
])
def test_core_shares_are_contiguous_and_as_even_as_they_can_be(cores, n, want):
    assert core_shares(cores, n) == want


def test_workers_fail_once_with_one_message(tmp_path):
    # The timeout only bounds a hang: a parent left waiting for workers that will never be ready.
    result = subprocess.run([sys.executable, "-m", "serve", "--model-dir", str(tmp_path / "missing"), "--port", "0",
                             "--workers", "3"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors[0] == f"python -m serve: error: --model-dir {tmp_path / 'missing'}: no such directory"
    assert errors[1:] == ["python -m serve: error: worker 0 exited with status 1 before it was ready"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "Invalid --workers: 0 (at least 1)"),
    (["--workers", "3", "--metrics-port", "65534"], "runs past port 65535"),
])
def test_workers_bad_options(argv, message, capsys):
    import serve.__main__ as serve_main
    with pytest.raises(SystemExit) as info:
        serve_main.main(["--model-dir", ".", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def _stop_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[worker ") and "python -m serve: stopped" in line]


def test_one_ctrl_c_drains_the_workers(exported):
    """A terminal sends Ctrl-C's SIGINT to the whole foreground process group: the workers must
    not count it besides the parent's forwarded SIGTERM as a second signal (which cancels calls in
    flight): one Ctrl-C drains."""
    proc, _, _, _ = start_workers("--model-dir", exported.root, "--model", MODEL, "--port", "0",
                                  "--workers", "2", "--grace", "5", "--drain-delay", "0.5", session=True)
    out = stop_workers(proc, lambda: os.killpg(proc.pid, signal.SIGINT))
    stopped = _stop_lines(out)
    assert len(stopped) == 2 and not any("second signal" in line for line in stopped), out
    assert out.count("draining: health NOT_SERVING") == 2, out


def test_two_quick_signals_stop_the_workers_at_once(exported):
    """Two signals reach the parent within one of its polls (SIGTERM and SIGINT: two of one kind
    sent back to back could merge at the parent itself): it passes both on, and each worker stops
    at once. (The second goes on as SIGINT, so it cannot merge with the first while that is still
    pending at a worker; that race is too narrow to provoke here.)"""
    proc, _, _, _ = start_workers("--model-dir", exported.root, "--model", MODEL, "--port", "0",
                                  "--workers", "2", "--grace", "5", "--drain-delay", "60")
    # A timeout well inside the 60 s drain a single signal asks for.
    out = stop_workers(proc, lambda: proc.send_signal(signal.SIGTERM), lambda: proc.send_signal(signal.SIGINT),
                       timeout=40)
    stopped = _stop_lines(out)
    assert len(stopped) == 2 and all("second signal" in line for line in stopped), out
