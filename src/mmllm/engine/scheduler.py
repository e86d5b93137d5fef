"""Continuous (iteration-level) batching: requests join the running batch between decoding steps and
leave it the step they finish, so a short answer never waits for a long one.

Each iteration admits queued requests first come, first served, while the batch has rows and cache
to spare (their prompts, images included, are read in chunks within the step's token budget), then
decodes one token for every row. Each row keeps its own settings (temperature, top-p, top-k, seed,
stop strings, token limit), so requests never split into batches by settings, and the rows that go
on keep their KV cache. Beam search, which cannot share a step, runs alone between two steps.
"""

from __future__ import annotations

import queue
import time
from collections import deque

from mmllm.engine.backend import Backend
from mmllm.engine.batcher import Closed, DynamicBatcher, Job, RequestQueue
from mmllm.engine.rows import RowTracker
from mmllm.engine.running import STEP_TOKENS, Row, RunningRows
from mmllm.engine.sampler import sampling_rng


class Scheduler(RequestQueue):
    def __init__(
        self, backend: Backend, max_rows: int = 16, step_tokens: int = STEP_TOKENS, thread: bool = True
    ):
        if backend.session is None:
            raise ValueError(f"the {backend.name} backend keeps no running batch: use the DynamicBatcher")
        self.batch = RunningRows(
            backend.session, backend.processor.stop_token_ids, max_rows, step_tokens, backend.shaper
        )
        self.waiting: deque[Row] = deque()
        self.jobs_of: dict[int, Job] = {}  # id(row) -> its job
        self.closing = False
        super().__init__(backend, thread)

    @property
    def depth(self) -> int:
        return self.jobs.qsize() + len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.batch.rows)

    def _row(self, job: Job) -> Row:
        tracker = RowTracker(
            self.backend.processor, [job.settings], [job.stop], self._deliver(job), [job.cancelled]
        )
        rng = sampling_rng(job.settings.seed)
        return Row(job.prompt, tracker, 0, rng, lambda: self._first_token(job))

    def _take_new(self) -> None:
        """Move submitted jobs to the waiting line; block for one when there is nothing else to do."""
        idle = not self.batch.rows and not self.waiting
        while True:
            if idle and self.closing:
                raise Closed
            try:
                job = self.jobs.get(block=idle)
            except queue.Empty:
                return
            if job is None:
                self.closing = True
                continue
            idle = False  # a job already cancelled still goes in line: it ends there, counted, as cancelled
            if job.settings.num_beams > 1:
                self._run_alone(job)
                continue
            row = self._row(job)
            self.jobs_of[id(row)] = job
            self.waiting.append(row)

    def _run_alone(self, job: Job) -> None:
        start = time.perf_counter()
        try:
            [result] = self.backend.complete_prompts(
                [job.prompt], job.settings, [job.stop], self._deliver(job), [job.cancelled]
            )
        except Exception as err:  # a bad request fails alone
            result = err
        self.events.ran(1, time.perf_counter() - start)
        self._settle(job, result)

    def _run(self) -> None:
        while True:
            self._take_new()
            for row in [row for row in self.waiting if row.tracker.cancelled[0].is_set()]:
                self.waiting.remove(row)  # its client left while it waited
                row.tracker.end(0, "cancelled")
                self._finish(row)
            while self.waiting and self.batch.room_for(self.waiting[0]):
                self.batch.add(self.waiting.popleft())
            if not self.batch.rows:
                continue
            start, rows = time.perf_counter(), len(self.batch.rows)
            try:
                finished = self.batch.iterate()
            except (
                Exception
            ) as err:  # a failure outside any one row's engine calls: the batch fails, not the server
                finished = self.batch.fail_all(err)
            self.events.ran(rows, time.perf_counter() - start)
            for row in finished:
                self._finish(row)

    def _finish(self, row: Row) -> None:
        result = row.failure or row.tracker.completions([len(row.prompt.input_ids)])[0]
        self._settle(self.jobs_of.pop(id(row)), result)


def request_queue(
    backend: Backend,
    scheduler: str = "continuous",
    max_rows: int = 16,
    max_wait_ms: float = 10,
    step_tokens: int = STEP_TOKENS,
    thread: bool = True,
) -> RequestQueue:
    """The queue a server or page answers through: the continuous `Scheduler` where the backend keeps a
    running batch (the torch and llama.cpp backends), else (or with scheduler="batch") the batcher.
    `thread`: it answers in a thread of its own; else the caller runs its `serve`."""
    if scheduler == "continuous" and backend.session is not None:
        return Scheduler(backend, max_rows, step_tokens, thread)
    return DynamicBatcher(backend, max_rows, max_wait_ms, thread)
