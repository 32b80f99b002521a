"""memdetect.core.hub: the offline switch and the checksummed download cache."""

from __future__ import annotations

import pytest

from memdetect.core import hub
from memdetect.errors import ModelNotFoundError


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"MEMDETECT_OFFLINE": "yes"}, {}])
def test_one_offline_switch(env, monkeypatch):
    for v in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert hub.offline() is bool(env)


def test_fetch_verifies_pinned_and_first_use_checksums(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDETECT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "remote.pkl"
    src.write_bytes(b"first version")
    url = src.as_uri()
    got = hub.fetch(url)  # trust on first use: digest recorded
    assert got.read_bytes() == b"first version" and got.parent == tmp_path / "cache" / "downloads"
    record = got.with_name(got.name + ".sha256")
    assert record.read_text().split()[0] == hub.sha256_file(got)
    assert hub.fetch(url) == got
    got.write_bytes(b"tampered")
    with pytest.raises(ModelNotFoundError, match="recorded on first download"):
        hub.fetch(url)
    got.unlink()  # a re-download must match the recorded digest too
    src.write_bytes(b"second version")
    with pytest.raises(ModelNotFoundError, match="refusing to use it"):
        hub.fetch(url)
    assert not got.exists()

    pinned = tmp_path / "pinned.pkl"
    pinned.write_bytes(b"payload")
    with pytest.raises(ModelNotFoundError, match="not the pinned"):
        hub.fetch(pinned.as_uri(), pinned=("0" * 64, 7))
    assert not list((tmp_path / "cache" / "downloads").glob("*pinned*"))
    assert hub.fetch(pinned.as_uri(), pinned=(hub.sha256_file(pinned), 7)).read_bytes() == b"payload"


def test_missing_download_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDETECT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="could not download .* --model-path FILE") as e:
        hub.fetch((tmp_path / "missing.pkl").as_uri())
    assert "\n" not in str(e.value)
    monkeypatch.setenv("MEMDETECT_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline mode is set"):
        hub.fetch("https://example.invalid/x.pkl")
