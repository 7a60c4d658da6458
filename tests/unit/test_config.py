from __future__ import annotations

import pytest

from shared.config import (
    ControllerSettings,
    Environment,
    RouterSettings,
    SettingsError,
    WorkerRole,
    WorkerSettings,
    load_settings,
)

pytestmark = pytest.mark.unit


def test_defaults_load_with_an_empty_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in (WorkerSettings, RouterSettings, ControllerSettings):
        settings = load_settings(cls)
        assert settings.redis_url.startswith("redis://")


def test_service_and_common_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_WORKER_ROLE", "decode")
    monkeypatch.setenv("SHOAL_REDIS_URL", "redis://example:6380/1")
    settings = load_settings(WorkerSettings)
    assert settings.role is WorkerRole.DECODE
    assert settings.redis_url == "redis://example:6380/1"


def test_bad_value_names_the_variable_the_value_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_WORKER_ROLE", "teacher")
    monkeypatch.setenv("SHOAL_REDIS_URL", "http://localhost")
    with pytest.raises(SettingsError) as caught:
        load_settings(WorkerSettings)
    message = str(caught.value)
    assert "SHOAL_WORKER_ROLE='teacher'" in message
    assert "'prefill', 'decode' or 'mixed'" in message
    assert "SHOAL_REDIS_URL='http://localhost'" in message
    assert "redis://" in message and "Fix:" in message


def test_cross_field_rule_explains_itself() -> None:
    with pytest.raises(SettingsError, match="must exceed twice heartbeat_interval_s"):
        load_settings(WorkerSettings, lease_ttl_s=1.0, heartbeat_interval_s=1.0)
    with pytest.raises(SettingsError, match="new last rank"):
        load_settings(WorkerSettings, engine="reference", ep_size=3, ep_rank=1, ep_join=True)
    assert load_settings(WorkerSettings, engine="reference", ep_size=3, ep_rank=2, ep_join=True).ep_join


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("a,b", ["a", "b"]), ('["x", "y"]', ["x", "y"]), ("", [])],
    ids=["comma", "json", "empty"],
)
def test_list_variables_accept_json_or_commas(monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]) -> None:
    monkeypatch.setenv("SHOAL_ROUTER_API_KEYS", raw)
    assert load_settings(RouterSettings).api_keys == expected


def test_admin_tokens_need_a_role() -> None:
    with pytest.raises(SettingsError, match="token:role"):
        load_settings(ControllerSettings, admin_tokens=["nothing"])


def test_prod_refuses_placeholder_secrets_and_redacts_secrets() -> None:
    with pytest.raises(SettingsError, match="placeholder secret"):
        load_settings(ControllerSettings, env=Environment.PROD, admin_tokens=["changeme:admin"])
    settings = load_settings(RouterSettings, api_keys=["k-123"], internal_token="t")
    assert settings.redacted()["api_keys"] == "***"
    assert settings.redacted()["internal_token"] == "***"
