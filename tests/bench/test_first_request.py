"""python -m bench.serve --first-request: fresh servers with warmup on and off in turn, each one's
first request and the following ones timed and checked, the server's own word on its warmup kept in
the rows, nothing left running. Timings are printed, never asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench.serve import main
from bench.serve.first_request import STEADY_REQUESTS, warmup_of
from tests.bench.test_serve import REPO_ROOT, _session_processes

N = 2  # servers per mode
RUN_TIMEOUT_S = 300  # only a hang reaches it: the run takes ~30 s (export included) on the 2-core machine


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One ``--first-request 2`` run in its own session, exporting resnext_mini into a fresh cache."""
    work = tmp_path_factory.mktemp("bench-first-request")
    out = work / "rows.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench.serve", "--first-request", str(N), "--threads", "1",
                             "--cache", str(work / "cache"), "--json", str(out)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    left = _session_processes(proc.pid)
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _session_processes(proc.pid)
    print(stdout, stderr, sep="\n")
    rows = json.loads(out.read_text()) if out.exists() else None
    return dict(code=proc.returncode, stdout=stdout, stderr=stderr, rows=rows, left=left)


def test_both_modes_run_in_turn_and_every_answer_matched(first):
    assert first["code"] == 0, first["stderr"][-2000:]
    servers = [r for r in first["rows"] if r["kind"] == "first_request"]
    assert [r["warmup"] for r in servers] == ["on", "off", "off", "on"]
    for r in servers:
        assert r["errors"] == 0 and r["requests"] == 1 + STEADY_REQUESTS, r
        assert r["first_ms"] > 0 and r["steady_ms"] > 0 and r["first_server_inference_ms"] > 0, r


def test_the_servers_say_they_warmed_up_only_in_the_on_mode(first):
    """What each server's ready line said, not the flags it was given: a server started without
    --no-warmup in the off mode, or one that ignores the flag, shows here."""
    servers = [r for r in first["rows"] if r["kind"] == "first_request"]
    for r in servers:
        if r["warmup"] == "on":
            assert r["server_warmed_up"] is True and r["server_warmup_s"] > 0, r
        else:
            assert r["server_warmed_up"] is False and r["server_warmup_s"] is None, r


def test_each_mode_has_its_figures_in_the_rows_and_the_table(first):
    modes = {r["warmup"]: r for r in first["rows"] if r["kind"] == "first_request_mode"}
    assert sorted(modes) == ["off", "on"]
    for r in modes.values():
        assert r["servers"] == N and r["errors"] == 0, r
        assert r["first_p50_ms"] > 0 and r["first_max_ms"] >= r["first_p50_ms"] and r["steady_p50_ms"] > 0, r
        assert r["first_over_steady"] > 0, r
    lines = first["stdout"].splitlines()
    assert any(ln.startswith("load average ") for ln in lines)
    header = next(ln for ln in lines if ln.startswith("warmup "))
    assert "first p50 ms" in header and "steady p50 ms" in header and "first/steady" in header
    assert [ln.split()[0] for ln in lines[lines.index(header) + 2:lines.index(header) + 4]] == ["on", "off"]


def test_first_request_run_stops_every_server(first):
    assert first["left"] == [], f"processes left behind: {first['left']}"


def test_warmup_is_read_from_the_ready_line():
    line = "python -m serve: listening on 127.0.0.1:5 (plaintext); models m:1 fp32; max batch 16, timeout 2 ms"
    assert warmup_of(line + "; warmed up in 0.25 s; http http://127.0.0.1:6/") == (True, 0.25)
    assert warmup_of(line + "; no warmup") == (False, None)
    assert warmup_of(line) == (None, None)


@pytest.mark.parametrize("argv, message", [
    (["--first-request", "0"], "Invalid --first-request: 0"),
    (["--first-request", "2", "--server", "127.0.0.1:1"], "--server: not with --first-request"),
    (["--first-request", "2", "--concurrency", "4"], "--concurrency: applies to the load"),
    (["--first-request", "2", "--batching", "on,off"], "--batching: --first-request takes one setting"),
])
def test_bad_first_request_options_are_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _error_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["--first-request", "2", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ": error: " in ln]
    return line.split(": error: ", 1)[1]


# One valid value of each option the mode does not honour, in the parser's order.
UNHONOURED_ARGV = [
    ["--server", "127.0.0.1:1"], ["--http-server", "127.0.0.1:2"], ["--peer", "kserve"],
    ["--peer-python", sys.executable], ["--concurrency", "4"], ["--duration", "1"], ["--workers", "2"],
    ["--instances", "2"], ["--protocol", "grpc"], ["--client-processes", "2"], ["--rounds", "2"],
    ["--max-requests", "10"], ["--quick"],
]


@pytest.mark.parametrize("option", UNHONOURED_ARGV, ids=lambda a: a[0])
def test_every_option_the_first_request_mode_ignores_is_refused_by_name(option, capsys):
    """An option --first-request would silently drop (the load's --max-requests, --client-processes,
    a --peer) is one error naming it, not a run that looks as if it had honoured it."""
    assert _error_line(option, capsys).startswith(f"{option[0]}: ")


@pytest.mark.parametrize("given, named", [
    # --peer alone fails the load's own check, which asks for --protocol: an option not given
    (["--peer", "kserve"], "--peer"),
    (["--peer", "kserve", "--protocol", "grpc-infer"], "--peer"),
    (["--max-requests", "10", "--client-processes", "1"], "--client-processes"),
    (["--quick", "--max-requests", "10", "--peer", "kserve"], "--peer"),
])
def test_the_option_named_is_one_given_first_in_a_fixed_order(given, named, capsys):
    line = _error_line(given, capsys)
    assert line.startswith(f"{named}: "), line
    assert [u[0] for u in UNHONOURED_ARGV if u[0] in line] == [named], line
