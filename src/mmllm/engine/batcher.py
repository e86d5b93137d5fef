"""Request queues: what the server, the chat page and `mmllm eval` submit requests to, one thread that
runs the model behind them (`mmllm serve --ui` shares one between the API and the page).

Two kinds. The continuous `Scheduler` (`scheduler.py`, the default wherever the backend keeps a
running batch) admits requests between decoding steps. The `DynamicBatcher` here, for backends
without one: concurrent requests wait up to `max_wait_ms` to share one batched generate call, run to
its end. Requests batch together only when their decoding settings agree (temperature, top-p, seed, ...);
each keeps its own token limit and stop strings, and streaming requests receive their text as the
shared batch produces it. Each request arrives prepared (`Backend.prepare`: decoded, resized,
tokenized on its own), so one client's bad input can only fail its own request; a request whose
client left is dropped before its batch starts, or its row stops at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mmllm.conversation import Message
from mmllm.engine.backend import Backend, Prompt
from mmllm.engine.rows import Completion, OnDelta
from mmllm.engine.settings import GenerationSettings


@dataclass
class Job:
    """One request in a queue: its prompt, its settings (its token limit among them), its stop strings,
    and where its answer goes. Made by `RequestQueue.job`."""

    prompt: Prompt
    settings: GenerationSettings
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    deltas: asyncio.Queue | None = None  # set for streaming requests
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_token: bool = False

    def cancel(self) -> None:
        """The client went away or timed out: stop spending compute on this request."""
        self.cancelled.set()
        if not self.future.done():
            self.future.cancel()

    @property
    def key(self) -> tuple:
        """Jobs with equal keys may share a batch."""
        return self.settings.batch_key()


class Closed(Exception):
    """The queue was closed: its thread ends."""


class Events:
    """What a request queue reports as it works; the server's metrics implement it."""

    def ran(self, rows: int, seconds: float) -> None:
        """One generate call (the batcher) or one decoding step (the scheduler) over `rows` rows."""

    def first_token(self, seconds: float) -> None:
        """A request's first token came `seconds` after it was queued."""

    def finished(self, result: Completion | BaseException) -> None:
        """A request's answer (or failure), cancelled ones included."""


class RequestQueue:
    """Requests in, answers out, in a thread of its own that runs the model: what the server, the chat
    page and `mmllm eval` submit to. `DynamicBatcher` and the continuous `Scheduler` are the two kinds."""

    def __init__(self, backend: Backend, thread: bool = True):
        """`thread`: answer in a thread of its own from now on; else the caller runs `serve`."""
        self.backend = backend
        self.events = Events()
        self.jobs: queue.Queue[Job] = queue.Queue()
        if thread:
            threading.Thread(target=self.serve, daemon=True, name=f"mmllm-{type(self).__name__}").start()

    @property
    def depth(self) -> int:
        """Requests waiting for a place in a batch."""
        return self.jobs.qsize()

    running = 0
    """Requests decoding now."""

    def job(
        self,
        prompt: Prompt,
        settings: GenerationSettings,
        stop: list[str] | None = None,
        stream: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Job:
        """A request for this queue, answered on `loop` (by default the running one); a streaming one
        also receives its text piece by piece. `submit` queues it."""
        loop = loop or asyncio.get_running_loop()
        return Job(
            prompt,
            settings,
            list(stop or []),
            loop,
            loop.create_future(),
            asyncio.Queue() if stream else None,
        )

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    async def stream(
        self, conversation: list[Message], images: list[Any], settings: GenerationSettings
    ) -> AsyncIterator[str]:
        """The answer's text piece by piece, batched with whatever else is running (the web UI's path).

        Closing the iterator early (the page's Stop button, a closed tab) cancels the generation.
        """
        prompt = await asyncio.to_thread(self.backend.prepare, conversation, images)
        job = self.job(prompt, settings, stream=True)
        self.submit(job)
        try:
            while (piece := await job.deltas.get()) is not None:
                yield piece
            await job.future  # raises the batch's error, if it failed
        finally:
            job.cancel()  # a no-op once the answer is complete

    def answer(
        self, prompts: Iterable[Prompt], settings: GenerationSettings, window: int = 64
    ) -> Iterator[Completion]:
        """The answers to `prompts`, in order, for callers without an event loop (`mmllm eval`); at most
        `window` prompts are prepared and queued at a time."""
        loop = asyncio.new_event_loop()
        prompts, queued = iter(prompts), deque()
        try:
            while True:
                while len(queued) < window and (prompt := next(prompts, None)) is not None:
                    job = self.job(prompt, settings, loop=loop)
                    self.submit(job)
                    queued.append(job)
                if not queued:
                    return
                yield loop.run_until_complete(queued.popleft().future)
        finally:
            for job in queued:
                job.cancel()  # a caller that stops reading stops the rest
            loop.close()

    def close(self) -> None:
        """Stop the queue's thread once the requests submitted before are answered."""
        self.jobs.put(None)

    def _settle(self, job: Job, result: Completion | BaseException) -> None:
        self.events.finished(result)
        with contextlib.suppress(RuntimeError):  # its event loop is gone: so is whoever waited
            job.loop.call_soon_threadsafe(_settle, job, result)

    def _first_token(self, job: Job) -> None:
        if not job.first_token:
            job.first_token = True
            self.events.first_token(time.perf_counter() - job.enqueued)

    def _deliver(self, job: Job) -> OnDelta:
        """What a job's text goes to: its stream's queue (streaming requests), its first-token time."""

        def on_delta(row: int, text: str) -> None:
            self._first_token(job)
            if job.deltas is not None:
                job.loop.call_soon_threadsafe(job.deltas.put_nowait, text)

        return on_delta

    def serve(self) -> None:
        """Answer jobs in this thread until the queue is closed."""
        with contextlib.suppress(Closed):
            self._run()

    def _run(self) -> None:
        """Answer jobs until closed (raising `Closed`)."""
        raise NotImplementedError


class DynamicBatcher(RequestQueue):
    """Requests that arrive together (within `max_wait_ms`) and share decoding settings run as one
    `complete_prompts` call, to its end: the queue for backends without a running batch."""

    def __init__(
        self, backend: Backend, max_batch_size: int = 8, max_wait_ms: float = 10, thread: bool = True
    ):
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.held: list[Job] = []  # jobs whose settings did not match the batch being formed
        self.generate_calls = 0
        super().__init__(backend, thread)

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + len(self.held)

    def _next_job(self, timeout: float | None = None) -> Job | None:
        """The next queued job whose client is still waiting, or None once closed (raises queue.Empty
        after `timeout`)."""
        while (job := self.jobs.get(timeout=timeout)) is not None and job.cancelled.is_set():
            pass
        return job

    def _next_batch(self) -> list[Job]:
        self.held = [job for job in self.held if not job.cancelled.is_set()]
        first = self.held.pop(0) if self.held else self._next_job()
        if first is None:
            raise Closed
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
            if job is None:  # closed: this batch is the last but for what it held back
                self.jobs.put(None)
                break
            (batch if job.key == first.key else self.held).append(job)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            start = time.perf_counter()
            deliveries = [self._deliver(job) for job in batch]
            self.running = len(batch)
            try:
                self.generate_calls += 1
                results: list[Completion | BaseException] = self.backend.complete_prompts(
                    [job.prompt for job in batch],
                    [job.settings for job in batch],
                    stop=[job.stop for job in batch],
                    on_delta=lambda row, text, to=deliveries: to[row](row, text),
                    cancelled=[job.cancelled for job in batch],
                )
            except Exception as err:  # one bad batch fails its requests, never the server
                results = [err] * len(batch)
            self.events.ran(len(batch), time.perf_counter() - start)
            self.running = 0
            for job, result in zip(batch, results, strict=True):
                self._settle(job, result)


def _settle(job: Job, result: Completion | BaseException) -> None:
    if job.future.done():  # the client went away or timed out
        return
    if isinstance(result, BaseException):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)
    if job.deltas is not None:
        job.deltas.put_nowait(None)  # end of stream
