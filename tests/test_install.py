"""infra/pip_uv.py: pip's effective settings (`pip config list`) become uv's options, with
pip's precedence ([install] over [global], PIP_* variables over both)."""

from __future__ import annotations

import pytest

from infra import pip_uv

LISTED = """\
:env:.cert='/certs/bundle.crt'
:env:.default-timeout='180'
:env:.disable-pip-version-check='1'
:env:.find-links='/wheels-env'
global.constraint='/pip/constraints.txt'
global.extra-index-url='file:///a/simple file:///b/simple'
global.find-links='/wheels'
global.index-url='https://global.example/simple'
install.index-url='https://install.example/simple'
install.trusted-host='install.example'
"""


def test_precedence_and_lists():
    settings = pip_uv.effective(LISTED)
    assert settings["index-url"] == "https://install.example/simple"
    assert settings["find-links"] == "/wheels-env"
    line = pip_uv.uv_command(settings, ["uv", "pip", "install"])
    assert line == [
        "SSL_CERT_FILE=/certs/bundle.crt", "UV_HTTP_TIMEOUT=180", "uv", "pip", "install",
        "--index-url", "https://install.example/simple",
        "--extra-index-url", "file:///a/simple", "--extra-index-url", "file:///b/simple",
        "--find-links", "/wheels-env", "--allow-insecure-host", "install.example",
        "--constraint", "/pip/constraints.txt"]


def test_nothing_configured_is_uv_alone():
    assert pip_uv.uv_command(pip_uv.effective(""), ["uv"]) == ["uv"]


def test_multiline_values_underscores_and_booleans():
    listed = "global.extra_index_url='file:///a\\nfile:///b'\n:env:.no-index='yes'\n" \
             "global.timeout='7.6'\nsite.find-links='/elsewhere'\n"
    line = pip_uv.uv_command(pip_uv.effective(listed), ["uv"])
    assert line == ["UV_HTTP_TIMEOUT=8", "uv", "--extra-index-url", "file:///a",
                    "--extra-index-url", "file:///b", "--no-index"]


def test_a_line_break_in_a_single_value_is_refused():
    with pytest.raises(ValueError):
        pip_uv.uv_command({"cert": "/a\n/b"}, ["uv"])
