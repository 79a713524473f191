"""The generation worker of the chat server (scripts.serve): requests wait in a queue and one thread decodes
everything waiting that can share a batch, so requests that arrive together are decoded together.

Requests share a batch when decoding them together gives each the answer it gets alone: the same AR sampling
settings (any greedy requests), or the same diffusion settings (block-causal ones also the same prompt length, since
their blocks start at the prompt's first token). Prompts are left-padded (model/inference/padding.py), so a greedy
answer in a batch equals its answer alone. A request that samples with its own seed decodes alone, to stay reproducible.

Cancellation: before every forward pass each request of the batch is asked whether it still wants tokens (its
client is still connected and its answer is not complete). When none does, the batch stops there, so a client that
gives up frees the model within one decoding step; a batch that other requests keep alive runs on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

from model.inference.ar import ARSamplerConfig, generate_batch
from model.inference.padding import left_pad
from model.inference.sampling import diffusion_generate
from model.tokenizer import EOS_ID, PAD_ID, StreamingDecoder
from scripts.common.device import autocast


class Cancelled(Exception):
    """No request of the batch wants more tokens: raised before a forward pass to stop decoding."""


class Job:
    """One request in the queue: its tokens become text deltas on `events`, then one end (or error) event."""

    def __init__(self, request, tokenizer, gone: Callable[[], bool] | None = None):
        self.request = request
        self.decoder = StreamingDecoder(tokenizer)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.gone = gone  # has the client left? (None: never asked)
        self.cancelled = threading.Event()
        self.count, self.finish, self.done = 0, "length", False

    def push(self, tokens: list[int]) -> None:
        """Take new ids up to EOS and max_tokens as text; the answer ends at either (later calls are ignored)."""
        if self.done:
            return
        tokens = tokens[: self.request.max_tokens - self.count]
        if EOS_ID in tokens:
            tokens = tokens[: tokens.index(EOS_ID) + 1]
            self.finish = "stop"
        self.count += len(tokens)
        text = self.decoder.push([t for t in tokens if t != EOS_ID])
        if text:
            self.events.put(("text", text))
        if self.finish == "stop" or self.count >= self.request.max_tokens:
            self.end()

    def end(self, error: Exception | None = None) -> None:
        if not self.done:
            self.done = True
            result = None if self.cancelled.is_set() else (self.finish, self.count)
            self.events.put(("error", error) if error is not None else ("end", result))

    def wanted(self) -> bool:
        """Does the request still want tokens? A client that has left cancels it."""
        if not self.done and not self.cancelled.is_set() and self.gone is not None and self.gone():
            self.cancelled.set()
        return not self.done and not self.cancelled.is_set()

    def wait(self, on_text: Callable[[str], None]) -> tuple[str, int] | None:
        """Hand each text delta to on_text until the answer ends: (finish_reason, completion tokens), or None when
        the request was cancelled. If on_text fails (the client went away), the request is cancelled."""
        try:
            while True:
                kind, value = self.events.get()
                if kind == "text":
                    on_text(value)
                elif kind == "error":
                    raise value
                else:
                    return value
        finally:
            self.cancelled.set()  # nobody reads the answer any more


def batch_key(request):
    """Requests with equal keys decode together with the answers they get alone."""
    sampled = request.temperature > 0
    if sampled and request.seed is not None:
        return ("alone", id(request))
    if request.sampler is not None:  # the diffusion settings include the temperature
        return ("diffusion", request.sampler, len(request.prompt_ids) if request.sampler.block_causal else None)
    return ("ar", request.temperature, request.top_k, request.top_p) if sampled else ("ar",)


class BatchWorker:
    """A queue of Jobs and the thread that decodes them, up to `max_batch` at a time."""

    def __init__(self, model, mask_id: int, max_batch: int = 16):
        self.model, self.mask_id, self.max_batch = model, mask_id, max_batch
        self.lock = threading.Lock()  # held while a batch decodes; holding it pauses the worker
        self.arrived = threading.Condition()
        self.pending: list[Job] = []
        self.batch_sizes: list[int] = []  # of every batch decoded, for reports and tests
        self.thread: threading.Thread | None = None
        self.closed = False

    def submit(self, job: Job) -> Job:
        with self.arrived:
            self.pending.append(job)
            self.arrived.notify()
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="generation", daemon=True)
                self.thread.start()
        return job

    def close(self) -> None:
        """Stop the thread once the batch in progress is done (queued requests are not answered)."""
        with self.arrived:
            self.closed = True
            self.arrived.notify()

    def _run(self) -> None:
        while True:
            with self.arrived:
                while not self.pending and not self.closed:
                    self.arrived.wait()
                if self.closed:
                    return
            with self.lock:
                self.decode(self._take())

    def _take(self) -> list[Job]:
        """The first waiting request and every later one that can share its batch, up to max_batch."""
        with self.arrived:
            for job in [job for job in self.pending if not job.wanted()]:
                self.pending.remove(job)
                job.end()
            if not self.pending:
                return []
            key = batch_key(self.pending[0].request)
            jobs = [job for job in self.pending if batch_key(job.request) == key][: self.max_batch]
            self.pending = [job for job in self.pending if all(job is not taken for taken in jobs)]
        return jobs

    def decode(self, jobs: list[Job]) -> None:
        """Decode `jobs` as one batch; every job ends (answered, cancelled or failed)."""
        if not jobs:
            return
        self.batch_sizes.append(len(jobs))

        worker = threading.get_ident()

        def stop_when_unwanted(_module, _args) -> None:
            # Only this batch's own forward passes: the hook sits on the shared model, which other threads may run.
            if threading.get_ident() == worker and not any(job.wanted() for job in jobs):
                raise Cancelled

        hook = self.model.register_forward_pre_hook(stop_when_unwanted)
        device = next(self.model.parameters()).device
        try:  # bf16 on CUDA (fp32 attention with grouped heads would run SDPA's math kernel); autocast is per thread
            with autocast(device, "bfloat16"):
                if jobs[0].request.sampler is None:
                    self._decode_ar(jobs)
                else:
                    self._decode_diffusion(jobs)
        except Cancelled:
            pass
        except Exception as err:  # a bug, not the clients' fault: each gets the error, the worker keeps serving
            for job in jobs:
                job.end(err)
        finally:
            hook.remove()
            for job in jobs:
                job.end()

    def _generator(self, jobs: list[Job]) -> torch.Generator | None:
        seed = jobs[0].request.seed
        if len(jobs) > 1 or seed is None:
            return None
        return torch.Generator(device=next(self.model.parameters()).device).manual_seed(seed)

    def _decode_ar(self, jobs: list[Job]) -> None:
        first = jobs[0].request
        sampler = ARSamplerConfig(first.temperature, first.top_k, first.top_p, banned_ids=(self.mask_id,))

        def on_step(tokens: torch.Tensor) -> None:
            for job, token in zip(jobs, tokens.tolist()):
                if token >= 0:
                    job.push([token])

        prompts = [job.request.prompt_ids for job in jobs]
        longest = max(job.request.max_tokens for job in jobs)
        generate_batch(self.model, prompts, longest, sampler, EOS_ID, PAD_ID, self._generator(jobs), on_step=on_step)

    def _decode_diffusion(self, jobs: list[Job]) -> None:
        device = next(self.model.parameters()).device
        ids, lengths = left_pad([job.request.prompt_ids for job in jobs], PAD_ID, device)

        def on_block(_k: int, block: torch.Tensor) -> None:
            for job, tokens in zip(jobs, block.tolist()):
                job.push(tokens)

        sampler = jobs[0].request.sampler
        diffusion_generate(
            self.model, ids, sampler, self.mask_id, EOS_ID, self._generator(jobs), on_block, prompt_lengths=lengths
        )
