"""Weights resolver and installer pieces that need no download (and one slow concurrent install)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from mmllm import weights
from mmllm.errors import MmllmError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "home"


def test_local_paths_win(tmp_path, home):
    (tmp_path / "lm").mkdir()
    assert weights.resolve(tmp_path / "lm").path == str(tmp_path / "lm")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    resolved = weights.resolve(gguf)
    assert (resolved.path, resolved.gguf_file) == (str(tmp_path), "m.gguf")


def test_registry_name_without_hub_or_install_says_what_to_run(home):
    with pytest.raises(MmllmError, match="mmllm weights install smollm2-135m-instruct"):
        weights.resolve("smollm2-135m-instruct")


def test_installed_offline_weights_are_used(home):
    entry = weights.REGISTRY["smollm2-135m-instruct"]
    entry.install_dir.mkdir(parents=True)
    (entry.install_dir / ".complete").write_text("ok")
    resolved = weights.resolve("smollm2-135m-instruct", kind="lm")
    assert resolved.path == str(entry.install_dir) and "offline fallback" in resolved.source


def test_kinds_unknown_names_and_hub_ids(home):
    with pytest.raises(MmllmError, match="is a whisper model"):
        weights.resolve("whisper-base", kind="lm")
    with pytest.raises(MmllmError, match="unknown model 'nope'"):
        weights.resolve("nope")
    with pytest.raises(MmllmError, match="unknown model"):
        weights.resolve("./missing/dir")
    assert weights.resolve("someone/some-model").path == "someone/some-model"
    vision = weights.resolve("clip-vit-base-patch32", kind="vision")
    assert not vision.pretrained


def test_join_verifies_size_and_checksum(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"hello ")
    parts[1].write_bytes(b"world")
    good = weights.OfflineSource(
        "test", (), lambda: parts, "ct2", size=11, sha256=hashlib.sha256(b"hello world").hexdigest()
    )
    weights._join_and_verify(parts, tmp_path / "out", good)
    assert (tmp_path / "out").read_bytes() == b"hello world"
    with pytest.raises(MmllmError, match="expected 12"):
        weights._join_and_verify(
            parts, tmp_path / "out2", weights.OfflineSource("t", (), list, "ct2", size=12)
        )
    wrong = weights.OfflineSource("t", (), list, "ct2", size=11, sha256="0" * 64)
    with pytest.raises(MmllmError, match="does not match"):
        weights._join_and_verify(parts, tmp_path / "out3", wrong)
    assert not (tmp_path / "out3").exists(), "a file that failed its checksum must not stay behind"


def test_install_rejects_unknown_and_hub_only(home):
    with pytest.raises(MmllmError, match="unknown weights"):
        weights.install("nope")
    with pytest.raises(MmllmError, match="no offline weights"):
        weights.install("clip-vit-base-patch32")


@pytest.mark.slow
def test_two_processes_installing_the_same_weights_both_succeed(tmp_path):
    """Each stages in a folder of its own; whichever finishes second keeps the first one's install."""
    env = {**os.environ, "MMLLM_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "mmllm", "weights", "install", "whisper-tiny.en"]
    runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err.decode()
    weights = tmp_path / "home" / "weights"
    assert sorted(p.name for p in weights.iterdir()) == ["whisper-tiny.en"]  # no staging left behind
    assert (weights / "whisper-tiny.en" / ".complete").is_file()
