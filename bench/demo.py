"""``python -m bench.demo`` (``make demo``): the whole job on the bundled digits, end to end.

train (``python -m zoo.train``) -> export (``python -m export.onnx``) -> serve (``python -m
serve``) -> classify every held-out digit through the gRPC client as a PNG -> accuracy and
latency -> stop the server. Each step runs as the command a user would type.

With ``DEMO_KEEP_SERVING=1`` the server stays up after the last step: the demo prints the web
page's address (the HTTP port, :mod:`serve.http`) and serves until Ctrl-C.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from serve.ready import parse_ready_line


def run(cmd: list[str]) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise SystemExit(f"demo: step failed (exit {code}): {' '.join(cmd)}")


def held_out_digits(seed: int, val_fraction: float) -> tuple[list[bytes], np.ndarray]:
    """The val split zoo.train held out, each 8x8 digit encoded as a PNG file would be."""
    from sklearn.datasets import load_digits

    from zoo.data import stratified_split

    digits = load_digits()
    classes = [str(i) for i in range(10)]
    _, val_idx = stratified_split(digits.target, val_fraction, seed, classes)
    pngs = []
    for i in val_idx:
        pixels = np.round(digits.images[i] / 16.0 * 255.0).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, digits.target[val_idx]


KEEP_SERVING_ENV = "DEMO_KEEP_SERVING"


def start_server(model_dir: str) -> tuple[subprocess.Popen, str, str | None]:
    cmd = [sys.executable, "-m", "serve", "--model-dir", model_dir, "--port", "0"]
    print(f"\n$ {' '.join(cmd)} &", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        ready = parse_ready_line(line)
        if ready is not None:
            return proc, ready.address, ready.http_url
    raise SystemExit(f"demo: the server exited before it was ready (exit {proc.wait()})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="where the demo writes (replaced each run)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: zoo.train's)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads classifying at once")
    args = p.parse_args(argv)
    py = sys.executable
    train_dir, model_dir = os.path.join(args.out, "train"), os.path.join(args.out, "models")
    shutil.rmtree(args.out, ignore_errors=True)
    t_start = time.perf_counter()

    print("== 1/4 train resnext_mini on scikit-learn's digits", flush=True)
    run([py, "-m", "zoo.train", "--out", train_dir, "--no-progress"]
        + (["--epochs", str(args.epochs)] if args.epochs else []))
    print("\n== 2/4 export the best checkpoint to ONNX (BatchNorm folded, verified against PyTorch)", flush=True)
    run([py, "-m", "export.onnx", "--checkpoint", os.path.join(train_dir, "best.pt"), "--out", model_dir,
         "--triton", "--no-progress"])

    print("\n== 3/4 serve it over gRPC", flush=True)
    from serve.client import Classifier

    from zoo.train import DEFAULTS

    pngs, labels = held_out_digits(DEFAULTS["seed"], DEFAULTS["val_fraction"])
    server, address, page = start_server(model_dir)
    try:
        print(f"\n== 4/4 classify the {len(pngs)} held-out digits as PNG files, {args.concurrency} at a time",
              flush=True)
        with Classifier(address) as client:
            client.classify(pngs[0])  # warm-up: first-call costs are not the steady state

            def one(png: bytes) -> tuple[int, float, dict]:
                t0 = time.perf_counter()
                result = client.classify(png, top_k=1)
                return int(result.top.label), (time.perf_counter() - t0) * 1e3, result.timing

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                answers = list(pool.map(one, pngs))
            wall = time.perf_counter() - t0
        if os.environ.get(KEEP_SERVING_ENV) == "1" and page is not None:
            print(f"\nthe web page: {page}/  (serving until Ctrl-C)", flush=True)
            try:
                server.wait()
            except KeyboardInterrupt:  # the server got the same Ctrl-C: let it drain and stop by itself
                try:
                    server.wait(30)
                except subprocess.TimeoutExpired:
                    pass
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        if server.stdout:
            print(server.stdout.read(), end="", flush=True)

    predicted = np.array([a[0] for a in answers])
    latency = np.array([a[1] for a in answers])
    server_total = np.array([a[2]["total"] for a in answers]) / 1e3
    print(f"\nheld-out accuracy through the server: {100 * (predicted == labels).mean():.2f}% "
          f"({(predicted == labels).sum()}/{len(labels)})")
    print(f"client round trip: p50 {np.percentile(latency, 50):.2f} ms, p99 {np.percentile(latency, 99):.2f} ms; "
          f"server total p50 {np.percentile(server_total, 50):.2f} ms; {len(pngs) / wall:.0f} images/s")
    print(f"demo took {time.perf_counter() - t_start:.0f} s; outputs: {train_dir}/ (checkpoints, metrics.jsonl, "
          f"curves.png), {model_dir}/ (ONNX model repository)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
