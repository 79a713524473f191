"""The generation worker of the chat server: requests wait in a queue and one thread decodes everything waiting that
can share a batch, i.e. every request whose answer in the batch is its answer alone: the same AR sampling settings (any
greedy ones), or the same diffusion settings (block-causal ones also the same prompt length, as their blocks start at
the prompt's first token); prompts are left-padded (model/inference/padding.py). A request that samples with its own
seed decodes alone, to stay reproducible. Before every forward pass each request is asked whether it still wants
tokens (its client is connected, its answer unfinished): when none does, the batch stops, freeing the model.
"""

import queue
import threading

import torch

from model.inference.ar import ARSamplerConfig, generate_batch
from model.inference.padding import left_pad
from model.inference.sampling import diffusion_generate
from model.tokenizer import EOS_ID, PAD_ID, StreamingDecoder
from scripts.common.device import autocast


class Cancelled(Exception):
    """No request of the batch wants more tokens: raised before a forward pass to stop decoding."""


class Job:
    """One request in the queue: its tokens become text deltas on `events`, then one final (result or error) event."""

    def __init__(self, request, tokenizer, gone=None):
        self.request, self.decoder, self.gone = request, StreamingDecoder(tokenizer), gone  # gone(): client left?
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.count, self.finish, self.done = 0, "length", False

    def push(self, tokens: list[int]) -> None:
        """Take new ids up to EOS and max_tokens as text; the answer ends at either (later calls are ignored)."""
        if self.done:
            return
        tokens = tokens[: self.request.max_tokens - self.count]
        if EOS_ID in tokens:
            tokens, self.finish = tokens[: tokens.index(EOS_ID) + 1], "stop"
        self.count += len(tokens)
        text = self.decoder.push([t for t in tokens if t != EOS_ID])
        if text:
            self.events.put(text)
        if self.finish == "stop" or self.count >= self.request.max_tokens:
            self.end()

    def end(self, error: Exception | None = None) -> None:
        if not self.done:
            self.done = True
            self.events.put(error or (None if self.cancelled.is_set() else (self.finish, self.count)))

    def wanted(self) -> bool:
        """Does the request still want tokens? A client that has left cancels it."""
        if not self.done and not self.cancelled.is_set() and self.gone is not None and self.gone():
            self.cancelled.set()
        return not self.done and not self.cancelled.is_set()

    def wait(self, on_text) -> tuple[str, int] | None:
        """Hand each text delta to on_text until the answer ends: (finish_reason, completion tokens), or None when
        the request was cancelled. If on_text fails (the client went away), the request is cancelled."""
        try:
            while isinstance(event := self.events.get(), str):
                on_text(event)
            if isinstance(event, Exception):
                raise event
            return event
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
        self.closed = False
        threading.Thread(target=self._run, name="generation", daemon=True).start()

    def submit(self, job: Job) -> Job:
        with self.arrived:
            self.pending.append(job)
            self.arrived.notify()
        return job

    def close(self) -> None:
        """Stop the thread once the batch in progress is done (queued requests are not answered)."""
        with self.arrived:
            self.closed = True
            self.arrived.notify()

    def _run(self) -> None:
        while True:
            with self.arrived:
                self.arrived.wait_for(lambda: self.pending or self.closed)
                if self.closed:
                    return
            with self.lock:
                self.decode(self._take())

    def _take(self) -> list[Job]:
        """The first waiting request that is still wanted and every later one that can share its batch."""
        with self.arrived:
            for job in [job for job in self.pending if not job.wanted()]:
                self.pending.remove(job)
                job.end()
            key = batch_key(self.pending[0].request) if self.pending else None
            jobs = [job for job in self.pending if batch_key(job.request) == key][: self.max_batch]
            self.pending = [job for job in self.pending if job not in jobs]
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
        first = jobs[0].request
        seed = first.seed if len(jobs) == 1 else None
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        prompts = [job.request.prompt_ids for job in jobs]

        def push(rows: list[list[int]]) -> None:  # each job's new ids
            for job, tokens in zip(jobs, rows):
                job.push(tokens)

        try:  # bf16 on CUDA (fp32 attention with grouped heads would run SDPA's math kernel); autocast is per thread
            with autocast(device, "bfloat16"):
                if first.sampler is None:
                    sampler = ARSamplerConfig(first.temperature, first.top_k, first.top_p, banned_ids=(self.mask_id,))
                    longest = max(job.request.max_tokens for job in jobs)
                    on_step = lambda step: push([[t] if t >= 0 else [] for t in step.tolist()])  # -1: row done
                    generate_batch(self.model, prompts, longest, sampler, EOS_ID, PAD_ID, generator, on_step=on_step)
                else:
                    ids, lengths = left_pad(prompts, PAD_ID, device)
                    on_block = lambda _k, block: push(block.tolist())
                    diffusion_generate(self.model, ids, first.sampler, self.mask_id, EOS_ID, generator, on_block,
                                       prompt_lengths=lengths)  # fmt: skip
        except Cancelled:
            pass
        except Exception as err:  # a bug, not the clients' fault: each gets the error, the worker keeps serving
            for job in jobs:
                job.end(err)
        finally:
            hook.remove()
            for job in jobs:
                job.end()
