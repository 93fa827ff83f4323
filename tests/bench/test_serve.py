"""python -m bench.serve: option checks, input choice, target rows, and one ``--quick`` run that must
produce every column and JSON row with every answer matching its input, and leave no process behind.
Timings are printed, never asserted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from bench.serve import main
from bench.serve.cli import build_parser, resolve_config
from bench.serve.clients import choose_inputs, softmax
from bench.serve.config import MAX_BATCH, PROG, RAW_MIN_CALLS, ROW_KEYS, TARGET_CONCURRENCY, Config, row
from bench.serve.report import COLUMNS, evaluate_scaling, evaluate_targets
from bench.serve.servers import server_command

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICK_TIMEOUT_S = 240  # the run itself takes ~20 s (export included) on the idle 2-core machine


def _session_processes(sid: int) -> list[str]:
    """``pid comm`` of every process whose session id is ``sid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.find("(") + 1:text.rfind(")")]
        fields = text.rpartition(")")[2].split()
        if len(fields) > 3 and fields[3] == str(sid):
            found.append(f"{entry} {comm}")
    return found


# --------------------------------------------------------------------------- the quick run


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run in its own session, exporting into a fresh cache."""
    work = tmp_path_factory.mktemp("bench-serve")
    out = work / "rows.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.serve", "--quick", "--cache", str(work / "cache"),
                             "--json", str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=QUICK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    left = _session_processes(proc.pid)
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker leaves once its parent is gone
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _session_processes(proc.pid)
    print(stdout, stderr, sep="\n")
    rows = json.loads(out.read_text()) if out.exists() else None
    return dict(code=proc.returncode, stdout=stdout, stderr=stderr, rows=rows, left=left, cache=work / "cache")


def test_quick_run_succeeds_and_exported_into_its_cache(quick):
    assert quick["code"] == 0, quick["stderr"][-2000:]
    assert (quick["cache"] / "resnext_mini" / "1" / "model.onnx").is_file()
    assert not [p for p in os.listdir(quick["cache"]) if p.startswith(".export-")]


def test_quick_run_stops_everything_it_started(quick):
    assert quick["left"] == [], f"processes left behind: {quick['left']}"


def test_quick_table_has_every_column_and_setting(quick):
    lines = quick["stdout"].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("batching "))
    for name, _ in COLUMNS:
        assert name in lines[header], name
    table = lines[header + 2:header + 6]
    assert sorted((line.split()[0], int(line.split()[2])) for line in table) == [
        ("off", 1), ("off", 4), ("on", 1), ("on", 4)]
    assert "raw session.run at batch 1" in quick["stdout"]
    assert "targets (measured, not asserted):" in quick["stdout"]
    # --quick has no 16-client setting: the report says which targets that leaves out, and why.
    assert "targets not measured by this run's settings" in quick["stdout"]
    assert "batching QPS gain at 16 clients: needs --concurrency with 16" in quick["stdout"]


def test_quick_json_rows_every_answer_matched(quick):
    rows = quick["rows"]
    assert rows is not None
    assert all(list(r) == list(ROW_KEYS) for r in rows)
    served = [r for r in rows if r["kind"] == "served"]
    assert sorted((r["batching"], r["concurrency"]) for r in served) == [("off", 1), ("off", 4), ("on", 1), ("on", 4)]
    for r in served:
        assert r["model"] == "resnext_mini"
        assert r["errors"] == 0 and r["mismatches"] == 0 and r["errors_by_code"] == {}, r
        assert r["requests"] > 0 and r["checked"] >= r["requests"]
        assert r["max_batch"] == MAX_BATCH[r["batching"]]
        for key in ("qps", "p50_ms", "p95_ms", "p99_ms", "mean_batch", "raw_p50_ms", "server_total_p50_ms",
                    "server_queue_p50_ms", "server_inference_p50_ms", "transport_p50_ms", "serving_cost_p50_ms",
                    "inference_busy",
                    "server_cpu", "client_cpu"):
            assert r[key] is not None and r[key] >= 0, (key, r)
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert 1 <= r["mean_batch"] <= r["max_batch"]
        assert (r["overhead"] is not None) == (r["concurrency"] == 1)
    assert all(r["mean_batch"] == 1 for r in served if r["batching"] == "off")  # --max-batch 1 really is off
    raw = [r for r in rows if r["kind"] == "raw"]
    assert len(raw) == 1 and raw[0]["p50_ms"] > 0 and raw[0]["requests"] >= RAW_MIN_CALLS
    targets = [r for r in rows if r["kind"] == "target"]
    # the overheads (no 16-client setting here), and the gaps beyond the bare echo and raw session.run
    assert sorted(r["batching"] for r in targets if r["unit"] != "ms") == ["off", "on"]
    assert sorted(r["batching"] for r in targets if r["unit"] == "ms") == ["off", "on"]
    assert all(r["protocol"] == "grpc" for r in served)
    [echo] = [r for r in rows if r["kind"] == "echo"]
    assert echo["p50_ms"] > 0 and echo["errors"] == 0
    assert all(isinstance(r["met"], bool) and r["note"] for r in targets)


# --------------------------------------------------------------------------- options and failures


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0,4"], "--concurrency"),
    (["--concurrency", "a"], "--concurrency"),
    (["--batching", "maybe"], "--batching: unknown maybe"),
    (["--duration", "0"], "Invalid --duration"),
    (["--threads", "0"], "Invalid --threads"),
    (["--client-processes", "0"], "Invalid --client-processes"),
    (["--rounds", "0"], "Invalid --rounds"),
    (["--server", "nohost"], "expected HOST:PORT"),
    (["--server", "127.0.0.1:1", "--batching", "on"], "--batching"),
    (["--server", "127.0.0.1:1", "--workers", "2"], "--workers: applies to the servers this tool starts"),
    (["--workers", "0,2"], "--workers: at least 1"),
    (["--instances", "0"], "Invalid --instances: 0"),
    (["--server", "127.0.0.1:1", "--instances", "2"], "--instances: applies to the servers this tool starts"),
    (["--model", "../x"], "invalid name"),
    (["--model-dir", "/nonexistent-dir"], "--model-dir"),
])
def test_bad_options_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_serve_imports_no_torch_and_exports_a_stale_cache_entry_again(quick, tmp_path):
    """bench.serve never imports torch (its export is python -m export.onnx in a subprocess), and
    it fills the cache through bench.latency's check: an export made before zoo.flops existed is
    exported again."""
    import shutil

    from bench import _common as common
    from contract.metadata import read_metadata
    from tests.bench.test_latency import _edited

    cache = tmp_path / "cache"
    shutil.copytree(quick["cache"], cache)
    path = common.cached_export(str(cache), "resnext_mini")
    _edited(path, flops=None, created="2000-01-01T00:00:00+00:00")
    code = ("import importlib, pkgutil, sys\n"
            "sys.modules['torch'] = None  # any import of torch now raises ImportError\n"
            "import bench.serve\n"
            "for m in pkgutil.walk_packages(bench.serve.__path__, 'bench.serve.'):\n"
            "    if m.name not in ('bench.serve.__main__', 'bench.serve.kserve_model'):  # a run; the peer's Python\n"
            "        importlib.import_module(m.name)\n"
            "from bench.serve.cli import build_parser, resolve_config\n"
            "from bench.serve.servers import ensure_model\n"
            "parser = build_parser()\n"
            "cfg = resolve_config(parser, parser.parse_args(['--cache', sys.argv[1], '--threads', '1']))\n"
            "print(ensure_model(cfg))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'export') and sys.modules[m]))\n")
    result = subprocess.run([sys.executable, "-c", code, str(cache)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=QUICK_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [str(cache), "[]"]
    assert "exporting resnext_mini (random weights)" in result.stderr
    assert common.cache_problem(path, "resnext_mini") is None
    assert read_metadata(path)["created"] != "2000-01-01T00:00:00+00:00"
    assert sorted(os.listdir(cache)) == ["resnext_mini"]


def test_workers_run_counts_the_cpu_of_every_worker(quick, tmp_path):
    """One short setting against a 2-worker server (the cache of the quick run: no export)."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "-m", "bench.serve", "--quick", "--cache", str(quick["cache"]),
                             "--workers", "2", "--batching", "off", "--concurrency", "4", "--duration", "1",
                             "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=QUICK_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a connection per client" in result.stdout
    served = [r for r in json.loads(out.read_text()) if r["kind"] == "served"]
    assert [(r["batching"], r["workers"], r["concurrency"]) for r in served] == [("off", 2, 4)]
    r = served[0]
    assert r["errors"] == 0 and r["requests"] > 0
    # the work is done in the workers, children of the process started: their CPU is counted
    assert r["server_cpu"] is not None and r["server_cpu"] > 0.2, r
    # each window's connections, one per client, over the two workers (the bench's own checks hold none)
    assert r["worker_connections"] and all(len(w) == 2 and sum(w) == 4 for w in r["worker_connections"]), r
    assert "connections held by each worker" in result.stdout


def test_instances_reach_the_servers_started(quick, tmp_path):
    """--instances 2: the servers run two model instances, each with its share of --threads."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "-m", "bench.serve", "--quick", "--cache", str(quick["cache"]),
                             "--instances", "2", "--threads", "2", "--batching", "on", "--concurrency", "4",
                             "--duration", "1", "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=QUICK_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "server onnxruntime threads 2 over 2 model instances" in result.stdout
    (r,) = [r for r in json.loads(out.read_text()) if r["kind"] == "served"]
    assert r["errors"] == 0 and r["requests"] > 0
    parser = build_parser()
    cfg = resolve_config(parser, parser.parse_args(["--instances", "2", "--threads", "4"]))
    command = server_command(cfg, "models", 16)
    assert command[command.index("--instances") + 1] == "2" and command[command.index("--threads") + 1] == "2"


def test_unservable_model_dir_is_one_line_exit_1(tmp_path, capsys):
    (tmp_path / "resnext_mini").mkdir()  # a model directory without versions
    assert main(["--model-dir", str(tmp_path), "--quick"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{PROG}: error: ")


# --------------------------------------------------------------------------- inputs and targets


def test_choose_inputs_are_distinct_clear_and_spread_over_classes():
    w = np.random.default_rng(1).standard_normal((3, 10))

    def run(x):  # a linear "model" on the per-channel means: flat colours decide the class
        return x.mean(axis=(2, 3)) @ w

    inputs, expected = choose_inputs(run, (3, 4, 4), np.random.default_rng(0), 6)
    assert len(inputs) == len(expected) == 6
    assert len({x.tobytes() for x in inputs}) == 6
    assert all(x.dtype == np.float32 and x.shape == (3, 4, 4) for x in inputs)
    assert len({c for c, _ in expected}) >= 3
    for x, (cls, p) in zip(inputs, expected):
        probs = softmax(run(x[None]))[0]
        assert cls == probs.argmax() and p == pytest.approx(probs.max())


def test_targets_report_value_and_bound():
    def served(batching, c, qps, p50, p99, batch, workers=1):
        return row(kind="served", protocol="grpc", batching=batching, workers=workers, concurrency=c, qps=qps,
                   p50_ms=p50, p99_ms=p99,
                   mean_batch=batch, max_batch=MAX_BATCH[batching], raw_p50_ms=1.0,
                   overhead=p50 / 1.0 if c == 1 else None, server_inference_p50_ms=1.0 * batch ** 0.5,
                   server_queue_p50_ms=0.5, server_other_p50_ms=0.3, transport_p50_ms=0.8,
                   serving_cost_p50_ms=1.5,
                   inference_busy=0.5, server_cpu=1.0, client_cpu=0.5)

    rows = [served("on", 1, 300, 3.0, 4.0, 1), served("on", 16, 1500, 10, 20, 8),
            served("off", 1, 350, 2.5, 3.5, 1), served("off", 16, 1000, 16, 30, 1),
            served("off", 1, 300, 3.5, 5.0, 1, workers=2), served("off", 16, 1600, 10, 18, 1, workers=2)]
    cfg = Config(model="m", model_dir=None, cache="c", server=None, threads=2, concurrency=[1, 16], duration_s=1,
                 batching=["on", "off"], workers=[1, 2], client_processes=2, rounds=1, max_requests=10, seed=0,
                 json_path=None)
    targets = {t["target"]: t for t in evaluate_targets(rows, cfg)}
    gain = targets[f"batching QPS gain at {TARGET_CONCURRENCY} clients"]
    assert gain["value"] == pytest.approx(1.5) and gain["met"] is True
    p99 = targets[f"p99 with batching at {TARGET_CONCURRENCY} clients / lone p50"]
    assert p99["value"] == pytest.approx(20 / 3.0) and p99["met"] is False and "Little's law" in p99["note"]
    over = targets["served p50 / raw session.run p50 (batching off)"]
    assert over["value"] == pytest.approx(2.5) and over["met"] is False and "gRPC" in over["note"]
    assert "(raw + that) / raw = 2.50x" in over["note"]  # raw 1.0 ms + serving cost 1.5 ms
    # the 2-worker server's single-client row is no overhead target: its workers have half the threads
    assert sorted(t["workers"] for t in targets.values() if t["target"].startswith("served p50")) == [1, 1]
    scaling = evaluate_scaling(rows, cfg)  # batching off has both worker counts at 16 clients; on does not
    assert [(t["batching"], t["workers"], t["concurrency"]) for t in scaling] == [("off", 2, 16)]
    assert scaling[0]["value"] == pytest.approx(1.6) and "QPS 1600 with 2 workers vs 1000 with 1" in scaling[0]["note"]


# --------------------------------------------------------------------------- protocols and the bare echo

PROTOCOLS = ("grpc", "grpc-infer", "http", "http-json")


@pytest.fixture(scope="module")
def protocols_run(quick, tmp_path_factory):
    """Every protocol against the servers it starts, 1 and 2 clients, batching on (the quick run's cache)."""
    out = tmp_path_factory.mktemp("bench-serve-protocols") / "rows.json"
    result = subprocess.run([sys.executable, "-m", "bench.serve", "--quick", "--cache", str(quick["cache"]),
                             "--protocol", ",".join(PROTOCOLS), "--batching", "on", "--concurrency", "1,2",
                             "--duration", "1", "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=QUICK_TIMEOUT_S)
    print(result.stdout, result.stderr, sep="\n")
    return dict(code=result.returncode, stdout=result.stdout, stderr=result.stderr,
                rows=json.loads(out.read_text()) if out.exists() else None)


def test_every_protocol_is_measured_and_every_answer_matched(protocols_run):
    assert protocols_run["code"] == 0, protocols_run["stderr"][-2000:]
    rows = protocols_run["rows"]
    assert all(list(r) == list(ROW_KEYS) for r in rows)
    served = [r for r in rows if r["kind"] == "served"]
    assert sorted((r["protocol"], r["concurrency"]) for r in served) == sorted(
        (p, c) for p in PROTOCOLS for c in (1, 2))
    for r in served:
        assert r["requests"] > 0 and r["errors"] == 0 and r["mismatches"] == 0 and r["errors_by_code"] == {}, r
        assert r["tail_ratio"] == pytest.approx(r["p99_ms"] / r["p50_ms"]) and r["tail_ratio"] >= 1
        # only Classify's answers carry the server's timing and batch size
        assert (r["mean_batch"] is not None) == (r["protocol"] == "grpc"), r
    [echo] = [r for r in rows if r["kind"] == "echo"]
    assert echo["p50_ms"] > 0 and echo["requests"] > 0 and echo["errors"] == 0 and echo["protocol"] == "echo"
    [raw] = [r for r in rows if r["kind"] == "raw"]
    for r in served:
        if r["concurrency"] == 1:
            assert r["echo_p50_ms"] == echo["p50_ms"]
            assert r["echo_gap_ms"] == pytest.approx(r["p50_ms"] - (echo["p50_ms"] + raw["p50_ms"]))
        else:
            assert r["echo_gap_ms"] is None
    ratios = {(r["protocol"], r["concurrency"]): r for r in rows if r["kind"] == "protocol"}
    assert sorted(ratios) == [("http", 1), ("http", 2), ("http-json", 1), ("http-json", 2)]
    by = {(r["protocol"], r["concurrency"]): r for r in served}
    for (p, c), r in ratios.items():  # HTTP against the same operation over gRPC: ModelInfer
        assert r["value"] == pytest.approx(by[p, c]["p50_ms"] / by["grpc-infer", c]["p50_ms"])
        assert "grpc-infer" in r["target"]
    targets = [r for r in rows if r["kind"] == "target"]
    gaps = sorted(r["protocol"] for r in targets if r["unit"] == "ms")
    assert gaps == sorted(PROTOCOLS)
    assert [r["threshold"] for r in targets if r["target"].startswith("HTTP binary p50")] == [1.3]
    assert "protocol" in protocols_run["stdout"] and "bare gRPC echo" in protocols_run["stdout"]


def _rolled_model_dir(src, dst):
    """A copy of the model repository whose classifier answers every input with the next class:
    same name, shape and metadata, wrong answers."""
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    path = dst / "resnext_mini" / "1" / "model.onnx"
    m = onnx.load(str(path))
    gemm = m.graph.node[-1]
    for init in m.graph.initializer:
        if init.name in gemm.input[1:]:
            init.CopyFrom(numpy_helper.from_array(np.roll(numpy_helper.to_array(init), 1, axis=0), init.name))
    onnx.save(m, str(path))
    return dst


def test_http_answers_come_from_the_http_server_and_are_checked(quick, tmp_path):
    """gRPC from the right server, HTTP from another whose model answers the next class: every
    HTTP answer is a MISMATCH and the exit is 1, while gRPC's are all right. An HTTP client that
    went to the gRPC address instead, or left its answers unchecked, would see no mismatch."""
    from bench.serve.servers import ServerProcess

    wrong = _rolled_model_dir(quick["cache"], tmp_path / "wrong")
    servers = []
    try:
        for label, root in (("right", quick["cache"]), ("wrong", wrong)):
            servers.append(ServerProcess(label, [sys.executable, "-m", "serve", "--model-dir", str(root), "--model",
                                                 "resnext_mini", "--host", "127.0.0.1", "--port", "0", "--http-port",
                                                 "0", "--providers", "cpu", "--threads", "1"]))
        deadline = time.monotonic() + QUICK_TIMEOUT_S
        right_port, _ = servers[0].wait_ready(deadline), servers[1].wait_ready(deadline)
        out = tmp_path / "rows.json"
        result = subprocess.run([sys.executable, "-m", "bench.serve", "--model-dir", str(quick["cache"]),
                                 "--server", f"127.0.0.1:{right_port}",
                                 "--http-server", f"127.0.0.1:{servers[1].http_port}",
                                 "--protocol", "grpc,grpc-infer,http,http-json", "--concurrency", "1",
                                 "--duration", "1", "--json", str(out)], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=QUICK_TIMEOUT_S)
    finally:
        for s in servers:
            s.stop()
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 1, result.stderr[-2000:]
    served = {r["protocol"]: r for r in json.loads(out.read_text()) if r["kind"] == "served"}
    assert sorted(served) == sorted(PROTOCOLS)
    for p in ("grpc", "grpc-infer"):
        assert served[p]["errors"] == 0 and served[p]["requests"] > 0, served[p]
    for p in ("http", "http-json"):
        r = served[p]
        assert r["checked"] > 0 and r["errors_by_code"] == {"MISMATCH": r["checked"]} and r["requests"] == 0, r
    assert "MISMATCH" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--protocol", "grpc,smtp"], "--protocol: unknown smtp"),
    (["--server", "127.0.0.1:1", "--protocol", "http"], "pass --http-server HOST:PORT"),
    (["--http-server", "127.0.0.1:1"], "--http-server: applies with --server"),
    (["--server", "127.0.0.1:1", "--http-server", "nohost", "--protocol", "http"], "expected HOST:PORT"),
])
def test_bad_protocol_options_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_peer_runs_in_the_same_rounds_with_the_same_clients(quick, tmp_path, kserve_python):
    """``--peer kserve``: KServe's server on the same model file, its ModelInfer and JSON REST
    answers checked like this server's, and paired per-round ratios. Skipped without ``make kserve-env``."""
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "-m", "bench.serve", "--model-dir", str(quick["cache"]), "--peer",
                             "kserve", "--protocol", "grpc,grpc-infer,http-json", "--batching", "on",
                             "--concurrency", "1", "--duration", "2", "--rounds", "2", "--json", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=QUICK_TIMEOUT_S)
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    served = {(r["batching"], r["protocol"]): r for r in rows if r["kind"] == "served"}
    # Classify is this server's own protocol: the peer is measured on the Open Inference Protocol only
    assert sorted(served) == [("kserve", "grpc-infer"), ("kserve", "http-json"), ("on", "grpc"),
                              ("on", "grpc-infer"), ("on", "http-json")]
    for r in served.values():
        assert r["requests"] > 0 and r["errors"] == 0 and r["mismatches"] == 0, r
    for p in ("grpc-infer", "http-json"):
        # the peer's own process did the work (clients sent to this server instead would leave it idle;
        # a bound only an idle peer fails)
        assert served["kserve", p]["server_cpu"] > 0.05, served["kserve", p]
    peer = {r["protocol"]: r for r in rows if r["kind"] == "peer"}
    assert sorted(peer) == ["grpc-infer", "http-json"]
    for r in peer.values():
        assert r["rounds"] == 2 and r["batching"] == "on" and r["concurrency"] == 1
        assert all(r[k] is not None and r[k] > 0 for k in ("qps_ratio", "p50_ratio", "p99_ratio")), r
        # both one-client gaps beyond the bare echo and raw session.run, side by side
        assert r["echo_gap_ms"] == served["on", r["protocol"]]["echo_gap_ms"] is not None, r
        assert r["peer_echo_gap_ms"] == served["kserve", r["protocol"]]["echo_gap_ms"] is not None, r
    gaps = sorted((r["batching"], r["protocol"]) for r in rows if r["kind"] == "target" and r["unit"] == "ms")
    assert gaps == sorted(served), gaps
    assert "against the peer" in result.stdout


def test_the_peer_gets_the_echo_gap_row_beside_this_servers():
    """The one-client gap beyond a bare echo and raw session.run is a target row for the peer's
    settings as for this server's, and the paired row carries both, in the JSON and the report."""
    from types import SimpleNamespace

    from bench.serve.measure import Setting, add_echo_gaps, setting_row
    from bench.serve.report import evaluate_peer, report

    cfg = Config(model="m", model_dir=None, cache="c", server=None, threads=2, concurrency=[1, 4], duration_s=2,
                 batching=["on"], workers=[1], client_processes=2, rounds=2, max_requests=10, seed=0,
                 json_path=None, protocols=["grpc-infer", "http-json"], peer="kserve")

    def setting(batching, protocol, concurrency, latency_ms, rounds_ms):
        s = Setting(batching, concurrency, MAX_BATCH["on"] if batching == "on" else None, "t", None,
                    protocol=protocol)
        s.windows_s, s.server_cpu_s, s.client_cpu_s = 2.0, None, None
        s.data["latency_ms"] = latency_ms
        s.per_round = [dict(qps=1e3 / ms, p50_ms=ms, p99_ms=ms) for ms in rounds_ms]
        return s

    settings = [setting("on", p, c, [3.0, 3.0, 4.0], [3.0, 3.0]) for p in cfg.protocols for c in (1, 4)]
    settings += [setting("kserve", p, c, [2.5, 2.5, 3.0], [2.5, 2.5]) for p in cfg.protocols for c in (1, 4)]
    settings.append(setting("-", "echo", 1, [0.5, 0.5, 0.5], [0.5, 0.5]))
    rows = [setting_row(s, cfg, 1.0, 2) for s in settings]
    add_echo_gaps(rows, 1.25)
    served = [r for r in rows if r["kind"] == "served"]
    rows += evaluate_targets(served, cfg)
    rows += evaluate_peer(settings, cfg, rows)
    rows.append(row(kind="raw", model="m", p50_ms=1.0, p95_ms=1.0, requests=3, raw_idle_p50_ms=1.25))
    gaps = {(r["batching"], r["protocol"]): r["value"] for r in rows if r["kind"] == "target" and r["unit"] == "ms"}
    assert gaps == pytest.approx({("on", "grpc-infer"): 1.5, ("on", "http-json"): 1.5,
                                  ("kserve", "grpc-infer"): 1.0, ("kserve", "http-json"): 1.0})
    paired = {(r["protocol"], r["concurrency"]): r for r in rows if r["kind"] == "peer"}
    assert sorted(paired) == [("grpc-infer", 1), ("grpc-infer", 4), ("http-json", 1), ("http-json", 4)]
    for (_, c), r in paired.items():
        want = (1.5, 1.0) if c == 1 else (None, None)  # a gap is a one-client figure
        assert (r["echo_gap_ms"], r["peer_echo_gap_ms"]) == pytest.approx(want), r
    text = report(cfg, SimpleNamespace(input_size=(3, 4, 4)), rows, 2, {"cpu": "cpu", "cores": "2"})
    assert "served p50 - (echo p50 + raw p50) (kserve peer, grpc-infer): 1.000 ms" in text
    # The idle model's share of each gap: served 3.0 - (echo 0.5 + idle raw 1.25), and the peer's 2.5 - 1.75.
    assert "the model alone after 1 ms idle: p50 1.250 ms (+0.250 ms of the gap), served p50 - (echo p50 + that) " \
           "1.250 ms" in text
    assert "(+0.250 ms of the gap), served p50 - (echo p50 + that) 0.750 ms" in text
    assert "after 1 ms idle before each call: p50 1.25 ms" in text
    assert "batching on / kserve (grpc-infer, 1 client): QPS 0.83x, p50 1.20x, p99 1.20x; served p50 - (echo p50 " \
           "+ raw p50) 1.500 vs 1.000 ms" in text


def test_raw_after_idle_sleeps_before_each_call_untimed():
    """The idle raw figure is session.run after the model waited: the sleep comes before each
    call and stays out of the call's time."""
    from bench._common import Samples
    from bench.serve.measure import measure_raw

    calls: list[float] = []

    def run(x):
        calls.append(time.perf_counter())
        return x

    samples = Samples()
    measure_raw(run, [np.zeros((1, 2), np.float32)], 0.0, samples, idle_s=0.02)
    assert len(calls) == len(samples.times_ms) == RAW_MIN_CALLS
    assert min(np.diff(calls)) >= 0.02
    assert max(samples.times_ms) < 20.0


def test_the_peer_ratio_under_load_names_the_cpu_budget(monkeypatch):
    """Under load, each side's CPU per answer (server, clients) and the QPS this server would reach
    with every core busy at its cost: what bounds a throughput ratio on a machine the clients share."""
    from bench.serve import report as report_module

    monkeypatch.setattr(report_module.os, "cpu_count", lambda: 2)
    mine = row(kind="served", concurrency=16, qps=500.0, server_cpu=1.0, client_cpu=0.5)
    theirs = row(kind="served", concurrency=16, qps=400.0, server_cpu=0.8, client_cpu=0.4)
    note = report_module._cpu_budget(mine, theirs, "kserve")
    assert note == ("CPU ms per answer, server + its clients: this server 2.00 + 1.00, kserve 2.00 + 1.00; with all 2 "
                    "cores busy at that cost this server would answer 667 QPS, 1.67x kserve's 400")
    assert report_module._cpu_budget(row(kind="served", concurrency=1, qps=500.0, server_cpu=1.0, client_cpu=0.5),
                                     theirs, "kserve") is None  # one client waits; no core is the limit
    assert report_module._cpu_budget(mine, dict(theirs, server_cpu=None), "kserve") is None


@pytest.mark.parametrize("argv, message", [
    (["--peer", "kserve"], "add one of grpc-infer, http, http-json to --protocol"),
    (["--peer-python", "/usr/bin/python3"], "--peer-python: applies with --peer"),
    (["--peer", "torchserve", "--protocol", "grpc-infer"], "--peer"),
])
def test_bad_peer_options_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ort_spinning_reaches_the_servers_the_peer_and_raw_alike():
    """--ort-spinning is one setting for everything measured: a run where only zoo's servers spin
    (or only the peer) would compare two thread behaviours, not two servers."""
    from bench.serve.cli import build_parser, resolve_config
    from bench.serve.peer import serve_session_options
    from bench.serve.servers import server_command

    key = "session.intra_op.allow_spinning"
    parser = build_parser()
    for argv, want in (([], "0"), (["--ort-spinning"], "1")):
        cfg = resolve_config(parser, parser.parse_args(argv))
        assert cfg.spinning == (want == "1")
        assert ("--ort-spinning" in server_command(cfg, "models", MAX_BATCH["on"])) == (want == "1")
        assert serve_session_options(cfg.threads, cfg.spinning)["config"][key] == want


def test_http_client_reopens_a_keep_alive_connection_the_server_closed_while_idle():
    """uvicorn (the KServe peer) closes idle keep-alive connections after 65 s, longer than a round
    can be: the next call goes once more on a fresh connection instead of counting an error."""
    import socket
    import threading

    from bench.serve.protocols import BINARY_SIZE, HEADER_LENGTH, HttpInfer

    logits = np.array([[0.0, 3.0, 1.0]], dtype="<f4")
    head = json.dumps({"outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, 3],
                                    "parameters": {BINARY_SIZE: logits.nbytes}}]}).encode()
    answer = (f"HTTP/1.1 200 OK\r\nContent-Length: {len(head) + logits.nbytes}\r\n{HEADER_LENGTH}: {len(head)}\r\n"
              "Content-Type: application/octet-stream\r\n\r\n").encode() + head + logits.tobytes()
    listener = socket.create_server(("127.0.0.1", 0))
    connections = []

    def serve() -> None:  # one answer per connection, then the connection is closed: an idle timeout
        for _ in range(2):
            conn, _ = listener.accept()
            connections.append(conn)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            length = int(next(line.split(b":")[1] for line in data.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(data.split(b"\r\n\r\n", 1)[1]) < length:
                data += conn.recv(65536)
            conn.sendall(answer)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = HttpInfer(f"127.0.0.1:{listener.getsockname()[1]}", timeout=10.0, binary=True)
    x = np.zeros((3, 4, 4), dtype=np.float32)
    try:
        assert client.call(x, "m").top_class == 1
        time.sleep(0.2)  # the server has closed the kept-alive connection by now
        assert client.call(x, "m").top_class == 1
    finally:
        client.close()
        listener.close()
    thread.join(10)
    assert len(connections) == 2


def test_model_cpu_per_row_divides_cpu_time_by_the_rows_run():
    """CPU per row at each batch size: the process's CPU time over every row run (a fake clock
    that charges 2 ms a row and 1 ms a call, so batching shows its saving)."""
    from bench.serve.measure import model_cpu_per_row

    cpu, shapes = [0.0], []

    def run(x):
        shapes.append(x.shape)
        cpu[0] += 1e-3 + 2e-3 * len(x)
        return x

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    per_row = model_cpu_per_row(run, x, [1, 4], seconds=0.0, cpu_clock=lambda: cpu[0])
    assert per_row == pytest.approx({1: 3.0, 4: 2.25})
    assert set(shapes) == {(1, 2, 3), (4, 2, 3)} and shapes.count((4, 2, 3)) >= 4  # 3 timed calls and the untimed


def test_the_cpu_budget_says_what_the_peer_target_leaves_for_serving(monkeypatch):
    """With the model's CPU per row batched: what PEER_QPS_TARGET x the peer's QPS at the peer's
    cost leaves for this server's own work per answer, beside what that work takes now."""
    from bench.serve import report as report_module

    monkeypatch.setattr(report_module.os, "cpu_count", lambda: 2)
    mine = row(kind="served", concurrency=16, qps=500.0, server_cpu=1.0, client_cpu=0.5)
    theirs = row(kind="served", concurrency=16, qps=400.0, server_cpu=1.2, client_cpu=0.6)
    note = report_module._cpu_budget(mine, theirs, "kserve", model_row_ms=1.2)
    assert note.endswith("; 1.5x kserve's QPS at its cost allows this server 3.00 ms per answer: less the model "
                         "batched (1.20 ms a row) and its clients (1.00), 0.80 ms for serving, which takes 0.80")
    raw = row(kind="raw", cpu_per_row_ms={1: 1.5, 16: 1.2})
    assert report_module._cpu_per_row_text(raw) == ("; CPU per row (all its threads): batch 1 1.50 ms, batch 16 "
                                                    "1.20 ms (batch 16 costs 0.80x its rows run alone)")
    assert report_module._cpu_per_row_text(row(kind="raw")) == ""


def test_the_cpu_budget_sets_the_bare_echo_beside_the_room_left(monkeypatch):
    """Under load with a peer, the bare gRPC echo server's CPU per call at the same clients is the
    floor of any server on grpc's Python server: said beside the room the peer target leaves, and
    flagged when that room is below it. The echo row at that concurrency is the one used."""
    from types import SimpleNamespace

    from bench.serve import report as report_module
    from bench.serve.measure import Setting, setting_row

    monkeypatch.setattr(report_module.os, "cpu_count", lambda: 2)
    mine = row(kind="served", concurrency=16, qps=500.0, server_cpu=1.0, client_cpu=0.5)
    theirs = row(kind="served", concurrency=16, qps=400.0, server_cpu=1.2, client_cpu=0.6)
    note = report_module._cpu_budget(mine, theirs, "kserve", model_row_ms=1.2, echo_ms=0.3)
    assert note.endswith("0.80 ms for serving, which takes 0.80; a bare gRPC echo server takes 0.30 ms per call "
                         "at 16 clients")
    note = report_module._cpu_budget(mine, theirs, "kserve", model_row_ms=1.2, echo_ms=0.9)
    assert note.endswith("takes 0.90 ms per call at 16 clients: the room left is below what gRPC alone costs here")

    cfg = Config(model="m", model_dir=None, cache="c", server=None, threads=2, concurrency=[1, 16], duration_s=2,
                 batching=["on"], workers=[1], client_processes=2, rounds=1, max_requests=10, seed=0,
                 json_path=None, protocols=["grpc-infer"], peer="kserve")

    def setting(batching, protocol, concurrency, qps, server_cpu):
        s = Setting(batching, concurrency, MAX_BATCH["on"] if batching == "on" else None, "t", None,
                    protocol=protocol)
        s.windows_s, s.server_cpu_s, s.client_cpu_s = 1.0, server_cpu, 0.5
        s.data["latency_ms"] = [1.0] * qps
        s.per_round = [dict(qps=float(qps), p50_ms=1.0, p99_ms=1.0)]
        return s

    settings = [setting("on", "grpc-infer", 16, 500, 1.0), setting("kserve", "grpc-infer", 16, 400, 1.2),
                setting("-", "echo", 1, 1000, 0.5), setting("-", "echo", 16, 2000, 0.6)]
    rows = [setting_row(s, cfg, 1.0, 2) for s in settings]
    rows.append(row(kind="raw", model="m", p50_ms=1.0, p95_ms=1.0, requests=3, cpu_per_row_ms={1: 1.5, 16: 1.2}))
    [peer] = report_module.evaluate_peer(settings, cfg, rows)
    assert peer["cpu_note"].endswith("a bare gRPC echo server takes 0.30 ms per call at 16 clients")  # not 0.50
    text = report_module.report(cfg, SimpleNamespace(input_size=(3, 4, 4)), rows, 2, {"cpu": "cpu", "cores": "2"})
    assert "; at 16 clients 2000 QPS, p50 1.000 ms, 0.30 ms of its CPU per call" in text
    assert [s.label for s in settings[2:]] == ["bare gRPC echo, 1 client", "bare gRPC echo, 16 clients"]


def test_a_server_with_workers_is_paired_with_the_peer_too():
    """``--workers 2`` is how this server uses both cores for one model: its setting gets a paired
    ratio of its own, named by its workers, with no echo gap and no model-CPU room (those are one
    process's figures: raw session.run runs with all the threads, a worker with half)."""
    from bench.serve.measure import Setting, setting_row
    from bench.serve.report import evaluate_peer

    cfg = Config(model="m", model_dir=None, cache="c", server=None, threads=2, concurrency=[1, 16], duration_s=2,
                 batching=["on"], workers=[1, 2], client_processes=2, rounds=2, max_requests=10, seed=0,
                 json_path=None, protocols=["grpc-infer"], peer="kserve")

    def setting(batching, workers, concurrency, rounds_qps):
        s = Setting(batching, concurrency, MAX_BATCH["on"] if batching == "on" else None, "t", None,
                    workers=workers, protocol="grpc-infer")
        s.windows_s, s.server_cpu_s, s.client_cpu_s = 2.0, 2.0, 1.0
        s.data["latency_ms"] = [1e3 / q for q in rounds_qps]
        s.per_round = [dict(qps=q, p50_ms=1e3 / q, p99_ms=2e3 / q) for q in rounds_qps]
        return s

    settings = [setting("on", w, c, [w * 100.0 * c, w * 100.0 * c]) for w in (1, 2) for c in (1, 16)]
    settings += [setting("kserve", 1, c, [80.0 * c, 80.0 * c]) for c in (1, 16)]
    rows = [setting_row(s, cfg, 1.0, 2) for s in settings]
    rows.append(row(kind="raw", model="m", p50_ms=1.0, p95_ms=1.0, requests=3, cpu_per_row_ms={16: 1.0}))
    paired = {(r["workers"], r["concurrency"]): r for r in evaluate_peer(settings, cfg, rows)}
    assert sorted(paired) == [(1, 1), (1, 16), (2, 1), (2, 16)]
    assert paired[2, 16]["qps_ratio"] == pytest.approx(2.5) and paired[1, 16]["qps_ratio"] == pytest.approx(1.25)
    assert paired[2, 16]["target"] == "batching on, 2 workers / kserve (grpc-infer, 16 clients)"
    assert "CPU ms per answer" in paired[2, 16]["cpu_note"]
    assert "less the model batched" not in paired[2, 16]["cpu_note"]
    assert "less the model batched" in paired[1, 16]["cpu_note"]
    assert paired[2, 1]["echo_gap_ms"] is None


def test_connections_are_counted_per_process_and_port():
    """What a --workers setting's tail depends on: the established connections each process holds
    on the server's port (the listening socket and the clients' own ends do not count)."""
    import socket

    from bench.serve.servers import connections_by_process

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    accepted = [listener.accept()[0] for _ in clients]
    try:
        assert connections_by_process([os.getpid()], port) == {os.getpid(): 3}
        accepted.pop().close()
        assert connections_by_process([os.getpid()], port) == {os.getpid(): 2}
    finally:
        for s in clients + accepted + [listener]:
            s.close()


def test_the_report_shows_each_windows_connections_per_worker():
    from types import SimpleNamespace

    from bench.serve.report import report

    cfg = Config(model="m", model_dir=None, cache="c", server=None, threads=2, concurrency=[16], duration_s=2,
                 batching=["on"], workers=[2], client_processes=2, rounds=2, max_requests=10, seed=0,
                 json_path=None, protocols=["grpc-infer"])
    served = row(kind="served", batching="on", workers=2, protocol="grpc-infer", concurrency=16, qps=100.0,
                 p50_ms=1.0, p95_ms=1.0, p99_ms=1.0, errors=0, worker_connections=[[8, 8], [4, 12], None])
    raw = row(kind="raw", model="m", p50_ms=1.0, p95_ms=1.0, requests=3)
    text = report(cfg, SimpleNamespace(input_size=(3, 4, 4)), [served, raw], 2, {"cpu": "cpu", "cores": "2"})
    assert "  batching on, 2 workers, grpc-infer, 16 clients: 8+8, 4+12, ?\n" in text  # ?: /proc could not say
