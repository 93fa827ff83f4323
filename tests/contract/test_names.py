"""The naming rule that --model, the RPCs, the client and the repository layout share."""
import pytest

from contract.names import parse_version, split_model_ref


@pytest.mark.parametrize("text, version", [("1", 1), ("12", 12), ("0", None), ("-1", None), ("x", None),
                                           ("", None), ("\u0663", None), ("1.0", None)])
def test_parse_version_takes_positive_ascii_integers_only(text, version):
    assert parse_version(text) == version


@pytest.mark.parametrize("ref, expected", [("resnext_mini", ("resnext_mini", None)),
                                           ("resnext_mini:2", ("resnext_mini", 2)),
                                           ("resnext_mini:0", ("resnext_mini:0", None)),
                                           ("resnext_mini:01", ("resnext_mini:01", None)),
                                           ("resnext_mini:v1", ("resnext_mini:v1", None)),
                                           (":3", (":3", None)),
                                           ("a:b:4", ("a:b", 4))])
def test_split_model_ref(ref, expected):
    assert split_model_ref(ref) == expected
