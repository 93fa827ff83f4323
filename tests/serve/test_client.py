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


def test_a_pil_image_is_classified_like_its_file(server, files):
    from PIL import Image

    with client.Classifier(f"127.0.0.1:{server[1]}") as c:
        from_file = c.classify(files["good"], model="resnext_mini", return_logits=True)
        with Image.open(files["good"]) as image:
            from_pil = c.classify(image, model="resnext_mini", return_logits=True)
        assert from_pil.logits == from_file.logits
        [many] = c.classify_many([Image.open(files["good"])], model="resnext_mini", return_logits=True)
        assert many.logits == from_file.logits


def test_token_with_the_newline_of_its_file_is_accepted(repo):
    with running(repo, token="s3cret") as (_, port):
        with client.Classifier(f"127.0.0.1:{port}", token="s3cret\n", timeout=10) as c:
            assert c.list_models().models
        for bad in ("", " \n", "two words"):
            with pytest.raises(ValueError, match="invalid token"):
                client.Classifier(f"127.0.0.1:{port}", token=bad)


@pytest.mark.parametrize("model, version, expected", [("resnext_mini", 0, ("resnext_mini", 0)),
                                                      ("resnext_mini:1", 0, ("resnext_mini", 1)),
                                                      ("resnext_mini:2", 2, ("resnext_mini", 2))])
def test_model_names_take_the_servers_name_version_syntax(model, version, expected):
    assert client.split_model(model, version) == expected


@pytest.mark.parametrize("model, version", [("resnext_mini:0", 0), ("resnext_mini:x", 0), ("resnext_mini:1", 2)])
def test_bad_model_versions_are_refused_before_sending(model, version):
    with pytest.raises(ValueError, match="resnext_mini"):
        client.split_model(model, version)


def test_client_cli_and_api_reach_a_version_by_name(server, files, capsys):
    with client.Classifier(f"127.0.0.1:{server[1]}") as c:
        r = c.classify(files["good"], model="resnext_mini:1")
        assert (r.model, r.version) == ("resnext_mini", 1)
    assert client.main([files["good"], "--model", "resnext_mini:1", "--server", f"127.0.0.1:{server[1]}"]) == 0
    assert "(resnext_mini v1," in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        client.main([files["good"], "--model", "resnext_mini:v1", "--server", f"127.0.0.1:{server[1]}"])
    assert e.value.code == 2 and "--model: invalid model 'resnext_mini:v1'" in capsys.readouterr().err
