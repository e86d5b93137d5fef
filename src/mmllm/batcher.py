"""Dynamic batching: concurrent requests wait up to `max_wait_ms` to share one batched generate call.
The server and the chat page both answer through one (`mmllm serve --ui` shares it between them).

Requests batch together only when their decoding settings agree (temperature, top-p, seed, ...);
each keeps its own token limit and stop strings, and streaming requests receive their text as the
shared batch produces it. Each request arrives prepared (`Backend.prepare`: decoded, resized,
tokenized on its own), so one client's bad input can only fail its own request; a request whose
client left is dropped before its batch starts, or its row stops at the next token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import astuple, dataclass, field
from typing import Any

from mmllm.conversation import Message
from mmllm.generation import Backend, Completion, GenerationSettings, Prompt


@dataclass
class Job:
    prompt: Prompt
    settings: GenerationSettings
    max_tokens: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deltas: asyncio.Queue | None = None  # set for streaming requests
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client went away or timed out: stop spending compute on this request."""
        self.cancelled.set()
        if not self.future.done():
            self.future.cancel()

    @property
    def key(self) -> tuple:
        return astuple(self.settings)[1:]  # everything but max_new_tokens (per row)


class DynamicBatcher:
    def __init__(self, backend: Backend, max_batch_size: int = 8, max_wait_ms: float = 10):
        self.backend, self.max_batch_size, self.max_wait = backend, max_batch_size, max_wait_ms / 1000
        # Called with (results, seconds) after each batch, cancelled rows included (the server's metrics).
        self.observers: list[Callable[[list[Completion | BaseException], float], None]] = []
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.held: list[Job] = []  # jobs whose settings did not match the batch being formed
        self.generate_calls = 0
        threading.Thread(target=self._run, daemon=True, name="mmllm-batcher").start()

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + len(self.held)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    async def stream(
        self, conversation: list[Message], images: list[Any], settings: GenerationSettings
    ) -> AsyncIterator[str]:
        """The answer's text piece by piece, batched with whatever else is running (the web UI's path).

        Closing the iterator early (the page's Stop button, a closed tab) cancels the generation.
        """
        prompt = await asyncio.to_thread(self.backend.prepare, conversation, images)
        loop = asyncio.get_running_loop()
        job = Job(prompt, settings, settings.max_new_tokens, [], loop, loop.create_future(), asyncio.Queue())
        self.submit(job)
        try:
            while (piece := await job.deltas.get()) is not None:
                yield piece
            await job.future  # raises the batch's error, if it failed
        finally:
            job.cancel()  # a no-op once the answer is complete

    def _next_job(self, timeout: float | None = None) -> Job:
        """The next queued job whose client is still waiting (raises queue.Empty after `timeout`)."""
        while (job := self.jobs.get(timeout=timeout)).cancelled.is_set():
            pass
        return job

    def _next_batch(self) -> list[Job]:
        self.held = [job for job in self.held if not job.cancelled.is_set()]
        first = self.held.pop(0) if self.held else self._next_job()
        batch, deadline = [first], time.perf_counter() + self.max_wait
        for job in list(self.held):
            if len(batch) < self.max_batch_size and job.key == first.key:
                self.held.remove(job)
                batch.append(job)
        while len(batch) < self.max_batch_size:
            try:
                job = self._next_job(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            (batch if job.key == first.key else self.held).append(job)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            start = time.perf_counter()

            def on_delta(row: int, text: str, batch=batch) -> None:
                job = batch[row]
                if job.deltas is not None:
                    job.loop.call_soon_threadsafe(job.deltas.put_nowait, text)

            try:
                self.generate_calls += 1
                results: list[Completion | BaseException] = self.backend.complete_prompts(
                    [job.prompt for job in batch],
                    batch[0].settings,
                    max_tokens=[job.max_tokens for job in batch],
                    stop=[job.stop for job in batch],
                    on_delta=on_delta,
                    cancelled=[job.cancelled for job in batch],
                )
            except Exception as err:  # one bad batch fails its requests, never the server
                results = [err] * len(batch)
            for observe in self.observers:
                observe(results, time.perf_counter() - start)
            for job, result in zip(batch, results, strict=True):
                job.loop.call_soon_threadsafe(_settle, job, result)


def _settle(job: Job, result: Completion | BaseException) -> None:
    if job.future.done():  # the client went away or timed out
        return
    if isinstance(result, BaseException):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)
    if job.deltas is not None:
        job.deltas.put_nowait(None)  # end of stream
