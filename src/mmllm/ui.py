"""The Gradio chat page: an image, text or voice questions, streamed answers, multi-turn history.

Answers go through a request queue (the continuous scheduler where the backend has a running batch,
as for the API): `mmllm serve --ui` shares the running batch between browser users and API clients,
and `mmllm ui` runs a queue of its own. Every failure becomes a message in the chat.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmllm.engine.batcher import RequestQueue
from mmllm.engine.settings import GenerationSettings
from mmllm.errors import MmllmError
from mmllm.images import load_image
from mmllm.serve.config import UiConfig
from mmllm.weights import mmllm_home

log = logging.getLogger("mmllm")

# Photos (scikit-image) and easy-VQA test images, each with a question to start from.
SAMPLE_QUESTIONS = {  # photos for the default photo model
    "chelsea": "What animal is this?",
    "coffee": "What drink is in the cup?",
    "motorcycle": "Is there a vehicle in the picture?",
    "camera": "What is the camera standing on?",
    "astronaut": "What colour is the flag?",
}
EASY_VQA_EXAMPLES = 3
NO_IMAGE_NOTE = "No image attached: the model answers from the text alone. Upload one to ask about it."


@dataclass
class Chat:
    """One browser session's conversation as the model sees it (the Chatbot shows its own copy)."""

    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    image_keys: list[str] = field(default_factory=list)


def example_files() -> list[list[str]]:
    """[image path, question] rows for gr.Examples: photos (the default model's), then easy-VQA images
    (the easy-VQA model's); sources whose package is missing are skipped."""
    from mmllm.data.easy_vqa import examples

    rows: list[list[str]] = []
    folder = mmllm_home() / "ui-examples"
    for name, question in SAMPLE_QUESTIONS.items():
        path = folder / f"{name}.png"
        try:
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                load_image(f"sample:{name}").save(path)
        except MmllmError:
            log.info("scikit-image not installed: no sample photos")
            break
        rows.append([str(path), question])
    try:
        rows += [[path, question] for path, question in examples(EASY_VQA_EXAMPLES)]
    except MmllmError:
        log.info("easy-vqa not installed: no easy-VQA examples")
    return rows


@dataclass(frozen=True)
class UnreadableUpload:
    """An upload that Gradio itself could not open, kept (by its own name) for the chat to report."""

    name: str
    problem: str = "not an image file this page can read"


def _keep_unreadable_uploads(component: Any) -> Any:
    """Let an image component's unreadable uploads reach the handler: failing in Gradio's own
    preprocessing would show a toast with the server's temp path and drop the question. (Per
    instance: a subclass of a Gradio component would make Gradio write a .pyi stub beside this file.)"""
    preprocess = component.preprocess

    def tolerant(payload: Any) -> str | UnreadableUpload | None:
        try:
            return preprocess(payload)  # None (no image) passes through
        except Image.DecompressionBombError:
            return UnreadableUpload(
                payload.orig_name or "the upload", "too large: it claims more pixels than any photo has"
            )
        except (OSError, ValueError, SyntaxError):
            return UnreadableUpload(payload.orig_name or "the upload")

    component.preprocess = tolerant
    return component


def _open_upload(image: str | UnreadableUpload) -> Image.Image:
    """The uploaded image, or an error that names the file as the user called it (never the
    server's temp path)."""
    if isinstance(image, UnreadableUpload):
        raise MmllmError(f"{image.name}: {image.problem}")
    try:
        return load_image(image)
    except MmllmError as err:
        raise MmllmError(str(err).replace(image, Path(image).name)) from None


def _image_key(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + str(image.size).encode()).hexdigest()


def _settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        repetition_penalty=float(repetition_penalty),
    )


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        raise MmllmError("the web UI needs gradio: pip install -e '.[ui]' in mmllm's checkout") from None
    return gr


class ChatHandlers:
    """What the page's buttons run: each question (typed or spoken) streamed through the request queue into
    the chat, its failures turned into chat messages of their own."""

    def __init__(self, requests: RequestQueue, whisper: str):
        self.requests, self.whisper, self.gr = requests, whisper, _gradio()

    async def answer(
        self,
        question: str,
        image: str | UnreadableUpload | None,
        history: list,
        chat: Chat,
        settings: GenerationSettings,
    ) -> AsyncIterator[tuple[list, Chat]]:
        """Add the question (and a new image) to the chat, then stream the answer into it."""
        turn = question
        new_image = None
        if image is not None:
            image = _open_upload(image)
            if not chat.image_keys or _image_key(image) != chat.image_keys[-1]:
                new_image, turn = image, "<image>\n" + question
                history = [*history, {"role": "user", "content": self.gr.Image(image)}]
        history = [*history, {"role": "user", "content": question}]
        if new_image is None and not chat.images:  # said on the page only: the model's prompt stays as asked
            history.append({"role": "assistant", "content": NO_IMAGE_NOTE})
        history.append({"role": "assistant", "content": ""})
        yield history, chat
        messages = [*chat.messages, {"role": "user", "content": turn}]
        images = chat.images + ([new_image] if new_image else [])
        text = ""
        async for piece in self.requests.stream(messages, images, settings):
            text += piece
            history[-1] = {"role": "assistant", "content": text.strip()}
            yield history, chat
        chat = Chat(
            [*messages, {"role": "assistant", "content": text.strip()}],
            images,
            chat.image_keys + ([_image_key(new_image)] if new_image else []),
        )
        yield history, chat

    async def guarded(
        self, steps: AsyncIterator[tuple[list, Chat]], history: list, chat: Chat, question: str = ""
    ) -> AsyncIterator[tuple[list, Chat, Any]]:
        """Pass the steps on with the question box locked; an error becomes an assistant message of its
        own, the conversation stays as it was, and the question goes back into the box to retry."""
        update = self.gr.update
        shown, after = history, chat
        try:
            async for shown, after in steps:
                yield shown, after, update(value="", interactive=False)
        except (MmllmError, ValueError, OSError, RuntimeError) as err:
            shown, after = [*history, {"role": "assistant", "content": f"Error: {err}"}], chat
            yield shown, after, update(value=question, interactive=True)
            return
        yield shown, after, update(interactive=True)

    async def on_text(self, question, image, history, chat, *settings):
        if not (question or "").strip():
            steps = _fail("type a question first")
        else:
            steps = self.answer(question.strip(), image, history, chat, _settings(*settings))
        async for update in self.guarded(steps, history, chat, question or ""):
            yield update

    async def on_voice(self, audio, image, history, chat, *settings):
        async def steps():
            if not audio:
                raise ValueError("record or upload a question first")
            from mmllm.audio import transcribe

            transcript = await asyncio.to_thread(transcribe, audio, self.whisper)
            async for update in self.answer(
                f"(voice) {transcript}", image, history, chat, _settings(*settings)
            ):
                yield update

        async for update in self.guarded(steps(), history, chat):
            yield *update, None  # the recording is used up


async def _fail(message: str):
    raise ValueError(message)
    yield  # an async generator that fails at once


@dataclass
class _Page:
    """The page's components that the events connect."""

    chat: Any
    image: Any
    chatbot: Any
    question: Any
    send: Any
    audio: Any
    ask_voice: Any
    stop: Any
    clear: Any
    settings: list


def _layout(gr: Any, model_name: str, vision_trained: bool) -> _Page:
    """Image left; conversation, question (text or voice tab) and buttons right; settings below."""
    vision_note = (
        "vision tower **trained**"
        if vision_trained
        else "vision tower **untrained** (random weights): answers ignore the image"
    )
    gr.Markdown(f"## mmllm\nModel **{model_name}** · {vision_note}", elem_id="model-info")
    chat = gr.State(Chat())
    with gr.Row():
        with gr.Column(scale=2):
            image = _keep_unreadable_uploads(
                gr.Image(
                    type="filepath",
                    image_mode=None,  # Gradio passes the file on undecoded: load_image checks its size first
                    label="Image",
                    sources=["upload", "clipboard"],
                    height=320,
                    elem_id="image",
                )
            )
        with gr.Column(scale=3):
            # Each message its own bubble: an error must not read as part of the previous answer.
            chatbot = gr.Chatbot(
                label="Conversation", elem_id="chat", height=460, group_consecutive_messages=False
            )
            with gr.Tabs():
                with gr.Tab("Text", elem_id="text-tab"):
                    question = gr.Textbox(
                        placeholder="Ask about the image and press Enter",
                        label="Question",
                        show_label=False,
                        elem_id="question",
                    )
                    send = gr.Button("Send", variant="primary", elem_id="send")
                with gr.Tab("Voice", elem_id="voice-tab"):
                    audio = gr.Audio(
                        sources=["microphone", "upload"],
                        type="filepath",
                        label="Spoken question",
                        elem_id="audio",
                    )
                    ask_voice = gr.Button("Ask", variant="primary", elem_id="ask-voice")
            with gr.Row():
                stop = gr.Button("Stop", elem_id="stop")
                clear = gr.Button("Clear conversation", elem_id="clear")
    defaults = GenerationSettings()
    with gr.Accordion("Generation settings", open=False, elem_id="settings"):
        settings = [
            gr.Slider(1, 512, value=defaults.max_new_tokens, step=1, label="Max new tokens"),
            gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature (0: greedy)"),
            gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p"),
            gr.Slider(0, 100, value=defaults.top_k, step=1, label="Top-k (0: off)"),
            gr.Slider(1.0, 2.0, value=defaults.repetition_penalty, step=0.05, label="Repetition penalty"),
        ]
    if rows := example_files():
        gr.Examples(rows, inputs=[image, question], label="Examples (image + question)", elem_id="examples")
    return _Page(chat, image, chatbot, question, send, audio, ask_voice, stop, clear, settings)


def _connect(gr: Any, page: _Page, handlers: ChatHandlers) -> None:
    inputs = [page.question, page.image, page.chatbot, page.chat, *page.settings]
    outputs = [page.chatbot, page.chat, page.question]
    answering = [
        trigger(handlers.on_text, inputs, outputs) for trigger in (page.question.submit, page.send.click)
    ]
    voice_inputs = [page.audio, page.image, page.chatbot, page.chat, *page.settings]
    answering.append(page.ask_voice.click(handlers.on_voice, voice_inputs, [*outputs, page.audio]))
    # Cancelling the handler closes its stream, which cancels the generation in the queue; the box
    # unlocks in a step after the cancellation, so no late update of the cancelled answer relocks it.
    page.stop.click(None, None, None, cancels=answering).then(
        lambda: gr.update(interactive=True), None, page.question
    )
    page.clear.click(
        lambda: ([], Chat(), None, ""), None, [page.chatbot, page.chat, page.image, page.question]
    )


def build_ui(requests: RequestQueue, model_name: str, whisper: str = "whisper-base") -> Any:
    """The chat page as `gr.Blocks` (launch it, or mount it into a FastAPI app)."""
    gr = _gradio()
    with gr.Blocks(title="mmllm") as page:
        _connect(
            gr, _layout(gr, model_name, requests.backend.vision_trained), ChatHandlers(requests, whisper)
        )
    return page


def serve_ui(requests: RequestQueue, model_name: str, cfg: UiConfig) -> None:
    """`mmllm ui`: the page on its own (the API server mounts it with `mmllm serve --ui`)."""
    page = build_ui(requests, model_name, cfg.whisper)
    page.queue().launch(server_name=cfg.host, server_port=cfg.port, show_error=True)


def mount_ui(
    app: Any,
    requests: RequestQueue,
    model_name: str,
    api_key: str | None = None,
    whisper: str = "whisper-base",
    path: str = "/ui",
) -> Any:
    """Mount the page into the API server's FastAPI app, sharing its request queue.

    With an API key the page asks for it on a login form (any user name, the key as password):
    a browser cannot send the API's Bearer header, and the page must not be a way around it.
    """
    import gradio as gr

    auth = (lambda user, password: password == api_key) if api_key else None
    return gr.mount_gradio_app(app, build_ui(requests, model_name, whisper), path=path, auth=auth)
