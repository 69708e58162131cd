"""The Hub check goes through huggingface_hub's own client (so HTTPS proxies and custom endpoints apply): a
transport failure stops at once naming the offline alternatives; any answer from the Hub, even an HTTP error,
means it is reachable."""
from __future__ import annotations

from typing import Any

import pytest
from huggingface_hub.errors import RepositoryNotFoundError

from lite_ft.errors import LiteFTError
from lite_ft.sources import hub


class FakeApi:
    """Stands in for HfApi: records the call and answers with `outcome` (raised if it is an exception)."""

    calls: list[tuple[str, str, float]] = []
    outcome: Any = None

    def _answer(self, kind: str, repo_id: str, timeout: float) -> Any:
        FakeApi.calls.append((kind, repo_id, timeout))
        if isinstance(FakeApi.outcome, BaseException):
            raise FakeApi.outcome
        return FakeApi.outcome

    def model_info(self, repo_id: str, timeout: float) -> Any:
        return self._answer("model", repo_id, timeout)

    def dataset_info(self, repo_id: str, timeout: float) -> Any:
        return self._answer("dataset", repo_id, timeout)


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[FakeApi]:
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    FakeApi.calls = []
    return FakeApi


def test_unreachable_hub_fails_fast_with_the_alternatives(fake_api: type[FakeApi]) -> None:
    fake_api.outcome = ConnectionError("proxy refused")  # the client's own transport errors vary by version
    with pytest.raises(LiteFTError) as err:
        hub.require_hub("org/model", "model", "catalog models work offline: x")
    assert "cannot be reached" in str(err.value) and "proxy refused" in str(err.value)
    assert "catalog models work offline" in str(err.value)
    assert fake_api.calls == [("model", "org/model", hub.PROBE_TIMEOUT_S)]


def test_an_http_error_means_the_hub_is_reachable(fake_api: type[FakeApi]) -> None:
    fake_api.outcome = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # a 404 (or 401) from the Hub
    hub.require_hub("org/d", "dataset", "builtin sets")  # the loader reports the precise problem later
    assert fake_api.calls[0][:2] == ("dataset", "org/d")


def test_offline_mode_is_respected_without_a_request(fake_api: type[FakeApi], monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LiteFTError, match="HF_HUB_OFFLINE"):
        hub.require_hub("org/model", "model", "catalog")
    assert fake_api.calls == []
