"""Models given by Hub id on a machine that cannot reach the Hub: one request, then the cached
copy (offline, nothing retried) or one line naming the id with the way out (docs/conventions.md)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants  # noqa: E402
from huggingface_hub.utils import _http  # noqa: E402

from jmllm.align.hub import HUB_HINT, HubUnavailableError, hub_ids, prepare_hub  # noqa: E402

REPO = "someone/some-model"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket is: connection refused


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub that refuses connections, an empty cache, offline mode off; requests counted."""
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test
    requests: list[str] = []
    session = _http.get_session()
    real_head = session.head

    def head(url, *args, **kwargs):
        requests.append(str(url))
        return real_head(url, *args, **kwargs)

    monkeypatch.setattr(session, "head", head)
    return requests


def _cache(root: Path, repo: str) -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_hub_ids_are_the_sources_that_are_not_local_paths(tmp_path):
    (tmp_path / "owl").mkdir()
    sources = [str(tmp_path / "owl"), REPO, None, "./local/dir", "w.safetensors", REPO, "gpt2"]
    assert hub_ids(sources) == [REPO, "gpt2"]


def test_unreachable_hub_one_request_then_one_line_with_the_way_out(hub):
    with pytest.raises(HubUnavailableError) as caught:
        prepare_hub([REPO, "local/../path.bin"])
    message = str(caught.value)
    assert len(hub) == 1  # one attempt, never retried
    assert message.startswith(f"{REPO}: the Hugging Face Hub (http://127.0.0.1:")
    assert message.endswith(HUB_HINT) and "\n" not in message
    assert "--tiny" in message and "HF_HUB_OFFLINE=1" in message
    assert caught.value.exit_code == 2


def test_unreachable_hub_with_cached_models_goes_offline(hub, tmp_path):
    _cache(Path(constants.HF_HUB_CACHE), REPO)
    prepare_hub([REPO])
    assert len(hub) == 1
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"


def test_offline_mode_asks_nothing_and_names_what_is_missing(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _cache(Path(constants.HF_HUB_CACHE), REPO)
    prepare_hub([REPO])  # cached: fine
    with pytest.raises(
        HubUnavailableError, match="other/model: not in the local Hugging Face cache"
    ):
        prepare_hub([REPO, "other/model"])
    assert hub == []


def test_local_sources_ask_nothing(hub, tmp_path):
    prepare_hub([tmp_path, str(tmp_path / "missing" / "folder"), None])
    assert hub == []
