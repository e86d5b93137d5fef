"""The Gradio chat page, live (`mmllm serve --ui`), driven by Playwright in Debian's headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port, save_tiny, serving, start_server
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import Pipeline
from mmllm.ui import NO_IMAGE_NOTE

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "ui"
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() and not os.environ.get("CI"),
    reason="needs Debian's chromium (apt-get install chromium); CI installs it",
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ui-model"), lm_init_std=0.3)


@pytest.fixture(scope="module")
def server(tiny_model):
    with serving(tiny_model, "--ui") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{server}/ui/")
    page.wait_for_selector("#question textarea", timeout=60_000)
    yield page
    page.close()


def letters(text: str) -> str:
    """Markdown rendering may change punctuation and spacing of a random model's text: compare the rest."""
    return re.sub(r"\W", "", text)


def bot_texts(page) -> list[str]:
    return [m.inner_text() for m in page.locator("#chat .message-row.bot-row").all()]


def ask(page, question: str) -> None:
    before = len(bot_texts(page))
    page.locator("#question textarea").fill(question)
    page.locator("#question textarea").press("Enter")
    page.wait_for_function(
        f"document.querySelectorAll('#chat .message-row.bot-row').length > {before}", timeout=60_000
    )
    wait_until_answered(page)


def wait_until_answered(page) -> None:
    """The question box is locked (in the same update that adds the answer bubble) while an answer
    streams, and unlocked when it is complete."""
    page.wait_for_function("!document.querySelector('#question textarea').disabled", timeout=120_000)


def test_chat_streams_keeps_history_and_clears(page, tiny_model, images):
    info = page.locator("#model-info").inner_text()
    assert str(tiny_model) in info and "untrained" in info
    # Record every text the answer bubble shows while it streams.
    page.evaluate(
        """() => { window.seen = [];
        new MutationObserver(() => {
            const rows = document.querySelectorAll('#chat .message-row.bot-row');
            if (rows.length) window.seen.push(rows[rows.length - 1].innerText);
        }).observe(document.querySelector('#chat'),
                   {subtree: true, childList: true, characterData: true}); }"""
    )
    page.locator("#image input[type=file]").set_input_files(str(images[0]))
    page.wait_for_selector("#image img")
    ask(page, "What shape is it?")
    first = bot_texts(page)[-1]
    assert first.strip()
    seen = [text for text in dict.fromkeys(page.evaluate("window.seen")) if text.strip()]
    assert len(seen) >= 3, f"the answer did not stream: {seen}"
    assert all(letters(seen[-1]).startswith(letters(text)) for text in seen), "streamed text must only grow"

    # The follow-up is answered with the first turn and the image still in the conversation.
    ask(page, "And its colour?")
    user_rows = page.locator("#chat .message-row.user-row")
    # Every message is its own bubble: the image, the first question, the follow-up.
    assert user_rows.count() == 3 and len(bot_texts(page)) == 2
    assert user_rows.first.locator("img").count() == 1  # the image shows once, before the first question
    assert user_rows.nth(1).inner_text().strip() == "What shape is it?"
    pipeline = Pipeline.load(str(tiny_model), device="cpu")
    settings = GenerationSettings()
    turns = [{"role": "user", "content": "<image>\nWhat shape is it?"}]
    assert letters(pipeline.generate([turns], [[images[0]]], settings)[0]) == letters(first)
    turns += [
        {"role": "assistant", "content": pipeline.generate([turns], [[images[0]]], settings)[0]},
        {"role": "user", "content": "And its colour?"},
    ]
    with_image = pipeline.generate([turns], [[images[0]]], settings)[0]
    assert letters(bot_texts(page)[-1]) == letters(with_image)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat.png", full_page=True)

    page.locator("#clear").click()
    page.wait_for_function("document.querySelectorAll('#chat .message-row').length === 0")
    assert page.locator("#image img").count() == 0


def test_a_question_without_an_image_is_marked_text_only(page):
    ask(page, "What colour is it?")
    texts = bot_texts(page)
    assert texts[0] == NO_IMAGE_NOTE and len(texts) == 2 and texts[1].strip()


def test_errors_are_chat_messages(page):
    ask(page, "Hello?")
    answered = bot_texts(page)
    page.locator("#question textarea").press("Enter")
    page.wait_for_function(
        f"document.querySelectorAll('#chat .message-row.bot-row').length > {len(answered)}"
    )
    # A bubble of its own: the previous answer reads as it did.
    assert bot_texts(page)[: len(answered)] == answered
    assert "type a question first" in bot_texts(page)[-1]
    page.locator("#voice-tab-button, button[role=tab]:has-text('Voice')").first.click()
    page.locator("#ask-voice").click()
    page.wait_for_function(
        "[...document.querySelectorAll('#chat .message-row.bot-row')]"
        ".some(r => r.innerText.includes('record'))"
    )
    # The page still works after the errors.
    page.locator("button[role=tab]:has-text('Text')").first.click()
    ask(page, "Still there?")
    assert bot_texts(page)[-1].strip()


def _broken_uploads(tmp_path, images) -> list[Path]:
    """Uploads the page must refuse in words: not an image, an RGBA or RGB PNG cut short, a header that
    claims more pixels than the page takes, and one past PIL's own bomb guard (it fails inside Gradio)."""
    from PIL import Image

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are not pixels")
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(rgba)
    rgba_cut = tmp_path / "rgba-cut.png"
    rgba_cut.write_bytes(rgba.read_bytes()[:90])
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(images[0].read_bytes()[:120])
    return [
        not_an_image,
        rgba_cut,
        truncated,
        _claims_pixels(tmp_path / "huge.png", 9000),
        _claims_pixels(tmp_path / "bomb.png", 20000),
    ]


def _claims_pixels(path: Path, side: int) -> Path:
    """A tiny PNG whose header claims side x side pixels: past the page's limit, or PIL's bomb guard."""
    import struct
    import zlib

    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_a_broken_image_is_a_chat_message(page, tmp_path, images):
    for broken in _broken_uploads(tmp_path, images):
        page.locator("#image input[type=file]").set_input_files(str(broken))
        page.wait_for_selector("#image img", state="attached")
        ask(page, "What is it?")
        error = bot_texts(page)[-1]
        assert error.startswith("Error:") and broken.name in error, error
        assert ("too large" in error) == (broken.stem in ("huge", "bomb")), error
        assert "/" not in error  # no server temp path
        assert not page.locator(".toast-body").count()  # no Gradio toast either
        assert page.locator("#question textarea").input_value() == "What is it?"  # kept, to ask again
    page.locator("#image input[type=file]").set_input_files(str(images[1]))  # the page goes on working
    page.wait_for_selector("#image img")
    ask(page, "And now?")
    assert "Error:" not in bot_texts(page)[-1]


def test_stop_ends_the_answer_and_its_generation(page, server):
    def cancelled() -> float:
        lines = httpx.get(f"{server}/metrics", timeout=10).text.splitlines()
        return float(next(line.split()[-1] for line in lines if line.startswith("mmllm_cancelled_total")))

    before = cancelled()
    page.locator("#settings").click()  # open the settings: the longest answer the slider allows
    page.locator("#settings input[type=number]").first.fill("512")
    page.locator("#settings input[type=number]").first.press("Enter")
    page.locator("#question textarea").fill("Tell me a long story.")
    page.locator("#question textarea").press("Enter")
    page.wait_for_function(  # the answer has begun to stream
        "[...document.querySelectorAll('#chat .message-row.bot-row')].pop()?.innerText.trim().length > 0",
        timeout=60_000,
    )
    page.locator("#stop").click()
    wait_until_answered(page)  # the box is usable again
    deadline = time.time() + 20
    while cancelled() == before and time.time() < deadline:
        time.sleep(0.2)
    assert cancelled() == before + 1  # the server stopped generating, not only the page


def test_examples_offer_photos_and_easy_vqa_images(page):
    import easy_vqa

    rows = page.locator("#examples tr.tr-body")
    rows.first.wait_for()
    assert rows.count() == 8  # 5 photos (the default model's), 3 easy-VQA test images
    assert easy_vqa.get_test_questions()[0][0] in page.locator("#examples").inner_text()
    rows.first.click()  # fills the image and the question
    page.wait_for_selector("#image img")
    assert page.locator("#question textarea").input_value() == "What animal is this?"
    ask(page, page.locator("#question textarea").input_value())
    assert page.locator("#chat .message-row.user-row img").count() == 1


def test_standalone_ui_command(tiny_model):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(
        [sys.executable, "-m", "mmllm.cli", "ui", "--model", str(tiny_model), "--port", str(port)], url
    )
    try:
        config = httpx.get(f"{url}/config", timeout=10).text
        assert "vision tower" in config and str(tiny_model) in config
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng")
def test_voice_question_shows_transcript_then_answer(page, tmp_path, images):
    wav = tmp_path / "question.wav"
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "120", "-w", str(wav), "What shape is in the image?"], check=True
    )
    page.locator("#image input[type=file]").set_input_files(str(images[0]))
    page.wait_for_selector("#image img")
    page.locator("button[role=tab]:has-text('Voice')").first.click()
    assert page.locator("#audio button[aria-label='Record audio']").count() == 1  # the microphone source
    page.locator("#audio button[aria-label='Upload file']").click()
    page.locator("#audio input[type=file]").set_input_files(str(wav))
    page.wait_for_selector("#audio audio", state="attached")  # the uploaded file's player
    page.locator("#ask-voice").click()
    page.wait_for_function(
        "[...document.querySelectorAll('#chat .message-row.user-row')]"
        ".some(r => r.innerText.includes('(voice)'))",
        timeout=120_000,
    )
    transcript = page.locator("#chat .message-row.user-row").last.inner_text()
    assert "shape" in transcript.lower() and "image" in transcript.lower()
    page.wait_for_function(
        "document.querySelectorAll('#chat .message-row.bot-row').length > 0 && "
        "[...document.querySelectorAll('#chat .message-row.bot-row')].pop().innerText.trim().length > 0",
        timeout=60_000,
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / "voice.png", full_page=True)


def test_with_an_api_key_the_page_asks_for_it(tiny_model):
    """`serve --ui --api-key K`: the page is no way around the key; its login form takes K as password."""
    with serving(tiny_model, "--ui", "--api-key", "page-key") as url:
        assert httpx.get(f"{url}/ui/config", timeout=10).status_code == 401
        with httpx.Client(timeout=10) as browser:
            wrong = browser.post(f"{url}/ui/login", data={"username": "me", "password": "guess"})
            assert wrong.status_code == 400
            assert browser.post(f"{url}/ui/login", data={"username": "me", "password": "page-key"}).is_success
            assert "vision tower" in browser.get(f"{url}/ui/config").text
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401  # the API still needs the header
