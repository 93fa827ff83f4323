"""serve.client's Python API: inputs read before a stream starts, errors that name their item, and
hints for a plaintext call to a TLS server and for a message over the server's size limit."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

import serve.client as client
from tests.serve.conftest import png_bytes, random_image, running

CODE = grpc.StatusCode
SMALL_LIMIT = 64 * 2**10  # bytes: the limit of a server started with a small --max-message-mb


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("client-files")
    good, junk, big = d / "good.png", d / "junk.png", d / "big.png"
    good.write_bytes(png_bytes(random_image(0)))
    junk.write_bytes(b"not an image")
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)  # PNG does not shrink it
    big.write_bytes(png_bytes(noise))
    assert big.stat().st_size > SMALL_LIMIT
    return dict(good=str(good), junk=str(junk), big=str(big), missing=str(d / "missing.png"))


def test_classify_many_reads_every_file_before_streaming(server, files):
    with client.Classifier(f"127.0.0.1:{server[1]}") as c:
        with pytest.raises(FileNotFoundError) as single:
            c.classify(files["missing"], model="resnext_mini")
        with pytest.raises(FileNotFoundError) as many:  # not "UNKNOWN: Exception iterating requests!"
            c.classify_many([files["good"], files["missing"]], model="resnext_mini")
        assert str(many.value) == str(single.value) and files["missing"] in str(many.value)
        assert len(c.classify_many(iter([files["good"]]), model="resnext_mini")) == 1  # any iterable


def test_item_errors_name_the_item(server, files):
    with client.Classifier(f"127.0.0.1:{server[1]}") as c:
        with pytest.raises(client.ClientError) as info:
            c.classify_many([files["good"], files["junk"]], model="resnext_mini")
        e = info.value
        assert (e.code, e.index, e.path) == (CODE.INVALID_ARGUMENT, 1, files["junk"])
        assert str(e).startswith(f"item 1 ({files['junk']}): INVALID_ARGUMENT: not a readable image")
        results = c.classify_many([files["junk"], b"junk", files["good"]], model="resnext_mini", raise_on_error=False)
        assert [(r.index, r.path) for r in results[:2]] == [(0, files["junk"]), (1, None)]
        assert str(results[1]).startswith("item 1: INVALID_ARGUMENT") and isinstance(results[2], client.Result)
        with pytest.raises(client.ClientError) as info:
            c.classify(files["junk"], model="resnext_mini")
        assert info.value.path == files["junk"] and info.value.index is None
        assert str(info.value).startswith(f"{files['junk']}: INVALID_ARGUMENT: not a readable image")


def test_plaintext_call_to_a_tls_server_hints_tls(repo, tls_files):
    key, cert = (tls_files / "key.pem").read_bytes(), (tls_files / "cert.pem").read_bytes()
    with running(repo, tls=(key, cert)) as (_, port):
        with client.Classifier(f"127.0.0.1:{port}", timeout=10) as c:
            for call in (lambda: c.classify(np.zeros((8, 8, 3), np.uint8), model="resnext_mini"),
                         lambda: c.classify_many([png_bytes(random_image(0))] * 2, model="resnext_mini"),
                         c.list_models):
                with pytest.raises(client.ClientError) as info:
                    call()
                e = info.value
                assert e.code == CODE.UNAVAILABLE and "is the server using TLS? pass tls_ca=" in e.message
                assert "is the server using TLS?" in str(e) and "\n" not in e.hint
        with client.Classifier(f"127.0.0.1:{port}", tls_ca=cert, timeout=10) as c:  # what the hint says works
            assert c.list_models().models
    with client.Classifier("127.0.0.1:1", timeout=5) as c:  # nothing listens: TLS is no answer
        with pytest.raises(client.ClientError) as info:
            c.list_models()
        assert info.value.code == CODE.UNAVAILABLE and "TLS" not in str(info.value)


def test_message_over_the_server_limit_names_the_item_and_the_flag(repo, files):
    with running(repo, max_message_bytes=SMALL_LIMIT) as (_, port):
        with client.Classifier(f"127.0.0.1:{port}", timeout=10) as c:
            assert c.classify(files["good"], model="resnext_mini").classes  # small ones still pass
            with pytest.raises(client.ClientError) as info:
                c.classify(files["big"], model="resnext_mini")
            e = info.value
            assert e.code == CODE.RESOURCE_EXHAUSTED and e.path == files["big"]
            assert "the server accepts messages up to 64.0 KiB, set by python -m serve --max-message-mb" in e.message
            with pytest.raises(client.ClientError) as info:
                c.classify_many([files["good"], files["big"], files["good"]], model="resnext_mini",
                                raise_on_error=False)
            e = info.value
            assert (e.code, e.index, e.path) == (CODE.RESOURCE_EXHAUSTED, 1, files["big"])
            assert str(e).startswith(f"item 1 ({files['big']}): RESOURCE_EXHAUSTED") and "--max-message-mb" in str(e)
