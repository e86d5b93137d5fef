"""Whisper on the packaged offline weights, on speech synthesised by espeak-ng. Slow: real weights."""

from __future__ import annotations

import base64
import shutil
import subprocess
import wave

import pytest

from mmllm.cli import main
from mmllm.errors import MmllmError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng"),
]
SENTENCE = "What color is the shape in this picture, and is there a triangle next to it?"


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    path = tmp_path_factory.mktemp("speech") / "sentence.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "120", "-w", str(path), SENTENCE], check=True)
    return path


@pytest.mark.parametrize("name", ["whisper-base", "whisper-tiny.en"])
def test_transcription_word_error_rate(name, speech, capsys):
    import jiwer

    assert main(["weights", "install", name]) == 0
    capsys.readouterr()
    assert main(["transcribe", str(speech), "--model", name]) == 0
    text = capsys.readouterr().out.strip()
    normalise = jiwer.Compose(
        [
            jiwer.ToLowerCase(),
            jiwer.RemovePunctuation(),
            jiwer.RemoveMultipleSpaces(),
            jiwer.Strip(),
            jiwer.ReduceToListOfListOfWords(),
        ]
    )
    error = jiwer.wer(SENTENCE, text, reference_transform=normalise, hypothesis_transform=normalise)
    assert error <= 0.2, f"{name}: {text!r} (WER {error:.2f})"


def test_unreadable_and_silent_audio_are_clear_errors(tmp_path):
    from mmllm.audio import transcribe

    (tmp_path / "noise.wav").write_bytes(b"RIFF not really audio")
    with pytest.raises(MmllmError, match="cannot decode the audio"):
        transcribe(tmp_path / "noise.wav")
    silence = tmp_path / "silence.wav"
    with wave.open(str(silence), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(16000)
        file.writeframes(b"\0\0" * 16000)
    with pytest.raises(MmllmError, match="no speech"):
        transcribe(silence)
    with pytest.raises(MmllmError, match="no such audio file"):
        transcribe(tmp_path / "missing.wav")


def test_server_transcribes_input_audio(speech):
    """The OpenAI `input_audio` part reaches the model as the transcribed question."""
    from fastapi.testclient import TestClient

    from conftest import make_tiny
    from mmllm.engine.torch_backend import Pipeline
    from mmllm.serve.app import create_app
    from mmllm.serve.config import ServeConfig

    app = create_app(Pipeline(*make_tiny("qwen2")), ServeConfig())
    audio = base64.b64encode(speech.read_bytes()).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}],
            }
        ],
        "max_tokens": 3,
    }
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] > 20  # the sentence, not an empty prompt
