"""API auth fails closed (issue 10 item 2; fault 9(g), the start-up half): no Ray needed, nothing is started."""

from __future__ import annotations

import logging

import pytest
import yaml

from metaaligner.serving.config import ServeConfig

VAR = "MA_TEST_AUTH_TOKEN_9G"


def _serve(**kw) -> dict:
    return {"corrector": {"model": "/nonexistent/model"}, **kw}


def test_auth_config_rules():
    assert ServeConfig.model_validate(_serve(auth_token_env=VAR)).auth == "token"  # token is the default
    with pytest.raises(ValueError, match="auth_token_env is not set"):
        ServeConfig.model_validate(_serve())  # default token without a variable: a config error
    with pytest.raises(ValueError, match=f"auth is `none` but serve.auth_token_env is '{VAR}'"):
        ServeConfig.model_validate(_serve(auth="none", auth_token_env=VAR))
    assert ServeConfig.model_validate(_serve(auth="none")).auth_token_env is None


@pytest.mark.parametrize("value", [None, "", "   "])
def test_fault_9g_missing_token_fails_closed(monkeypatch, value):
    """build() and `metaaligner serve` refuse to start, naming the variable, when it is unset or empty."""
    from metaaligner.serving.app import AuthConfigError, build

    if value is None:
        monkeypatch.delenv(VAR, raising=False)
    else:
        monkeypatch.setenv(VAR, value)
    with pytest.raises(AuthConfigError, match=f"environment variable {VAR} is unset or empty"):
        build(ServeConfig.model_validate(_serve(auth_token_env=VAR)))


def test_fault_9g_cli_refuses_to_start(monkeypatch, tmp_path, capsys):
    import ray

    from metaaligner.cli import main

    monkeypatch.delenv(VAR, raising=False)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"serve": _serve(auth="token", auth_token_env=VAR)}))
    ray_was_up = ray.is_initialized()
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert VAR in err and "refusing to start an open API" in err
    assert ray.is_initialized() == ray_was_up  # failed before starting anything


def test_token_set_builds_and_none_is_logged(monkeypatch, caplog):
    from metaaligner.serving.app import build

    monkeypatch.setenv(VAR, "s3cret")
    assert build(ServeConfig.model_validate(_serve(auth_token_env=VAR))) is not None
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert build(ServeConfig.model_validate(_serve(auth="none"))) is not None
    assert "OPEN to anyone" in caplog.text


@pytest.mark.parametrize("value,problem", [("abc\n", "whitespace"), (" abc", "whitespace"), ("ab c", "whitespace"),
                                           ("abc\t", "whitespace"), ("abc\x01", "control"), ("abc\x7f", "control"),
                                           ("abcé", "non-ASCII")])
def test_a_token_no_client_could_send_is_refused_at_start(monkeypatch, value, problem):
    """A token holding whitespace or control characters (e.g. the trailing newline of a Secret made with
    --from-file) is refused at start, naming the variable; it is never stripped silently."""
    from metaaligner.serving.app import AuthConfigError, build

    monkeypatch.setenv(VAR, value)
    with pytest.raises(AuthConfigError, match=f"{VAR} holds a bearer token with (a )?{problem}"):
        build(ServeConfig.model_validate(_serve(auth_token_env=VAR)))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "corrector.internal"])
def test_open_api_off_loopback_needs_explicit_consent(host):
    """auth: none on a host other than loopback is a config error unless allow_unauthenticated_public is set."""
    with pytest.raises(ValueError, match="allow_unauthenticated_public"):
        ServeConfig.model_validate(_serve(auth="none", host=host))
    assert ServeConfig.model_validate(_serve(auth="none", host=host, allow_unauthenticated_public=True)).auth == "none"
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert ServeConfig.model_validate(_serve(auth="none", host=loopback)).host == loopback
