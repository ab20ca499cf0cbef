"""exllamav2's dynamic generator with its decode steps on the GPU: a CUDA graph, then GPU sampling.

A step in which every job decodes one token with settings the GPU sampler has
(engine/gpu/sampling.py) replays the graph for its batch size, samples every job's token on the
GPU and copies the tokens back without waiting. Each job then takes its token as exllamav2's own
step would give it (stop strings, text, pages). Any other step (draft models, filters, a batch
size with no graph) is exllamav2's.

The host never waits for the GPU between two such steps of the same jobs: the next step is
enqueued, its input ids taken from the previous step's tokens on the GPU, before the host reads
those tokens and does each job's bookkeeping. A job that stops at that token drops its part of
the step already enqueued. Look-ahead needs settings that do not depend on the token being read
(no repetition penalty, no banned strings, not the job's last token); other steps read their
tokens before the next is enqueued.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from exllamav2.generator import ExLlamaV2DynamicGenerator
from exllamav2.util import cuda_sync_active

from engine.gpu import sampling
from engine.gpu.graphs import DecodeGraphs


@dataclass
class _Step:
    """A decode step enqueued on the GPU whose tokens the host has not read yet."""

    jobs: list  # None where a job's part of the step is dropped
    tokens: torch.Tensor  # (B,) on the GPU: the next step's input ids
    host_tokens: torch.Tensor  # (B,) host copies, valid once `done` has passed
    host_probs: torch.Tensor
    done: Any  # has synchronize(): a torch.cuda.Event on the GPU


class Generator(ExLlamaV2DynamicGenerator):
    look_ahead = True  # enqueue the next step before reading this one's tokens

    def __init__(self, *args: Any, graphs: DecodeGraphs, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graphs = graphs
        self.graph_steps = 0  # decode steps that replayed a graph
        self.ahead_steps = 0  # of them, enqueued before the previous step's tokens were read
        self._vocab_size = self.tokenizer.get_vocab_size()
        self._pending: _Step | None = None
        # Whether each job's settings are the GPU sampler's: read once per job, not per token.
        self._gpu_sampled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _suits_gpu(self, job: Any) -> bool:
        if job not in self._gpu_sampled:
            self._gpu_sampled[job] = (
                len(job.sequences) == 1
                and not job.filters
                and not job.embeddings
                and not job.return_logits
                and not job.return_top_tokens
                and sampling.supports(job.gen_settings)
            )
        return self._gpu_sampled[job]

    def _on_fast_path(self, job: Any) -> bool:
        """One sequence, one token to feed, nothing exllamav2's sampler alone can do."""
        sequence = job.sequences[0]
        return (
            self._suits_gpu(job)
            and len(sequence.sequence_ids) - sequence.kv_position == 1
            and not job.checkpoint
            and job.new_tokens >= job.min_new_tokens
        )

    def _can_look_ahead(self, job: Any) -> bool:
        """The step after the unread token needs nothing from it but its id, and will be used."""
        return (
            job.gen_settings.token_repetition_penalty == 1.0
            and not job.banned_strings
            and not job.checkpoint
            and job.new_tokens + 1 >= job.min_new_tokens
            and job.new_tokens + 1 < job.max_new_tokens
        )

    def iterate_gen(self, results: list, draft_tokens: torch.Tensor | None = None) -> None:
        jobs = [job for job in self.active_jobs if job.is_prefill_done()]
        pending, self._pending = self._pending, None
        if pending is not None:
            if (
                self.look_ahead
                and draft_tokens is None
                and pending.jobs == jobs
                and all(self._can_look_ahead(job) for job in jobs)
            ):
                ahead = self._enqueue(jobs, pending.tokens, unread=True)
                self._receive(pending, results)
                self._pending = self._feed(ahead)
                return
            self._receive(pending, results)
            jobs = [job for job in self.active_jobs if job.is_prefill_done()]
        if (
            draft_tokens is not None
            or self.current_loras
            or not self.graphs.covers(len(jobs))
            or not all(self._on_fast_path(job) for job in jobs)
        ):
            super().iterate_gen(results, draft_tokens)
            return
        for job in jobs:
            if job.time_first_token is None:
                cuda_sync_active()
                job.time_first_token = time.time()
        ids = torch.cat([job.get_input_ids_list(add_to_cache=True)[0] for job in jobs])
        step = self._enqueue(jobs, ids, unread=False)
        if self.look_ahead:
            self._pending = step  # read at the next call, after the step after it is enqueued
        else:
            self._receive(step, results)

    def _enqueue(self, jobs: list, ids: torch.Tensor, unread: bool) -> _Step:
        """Replay the graph and sample: ids (B, 1) on the host are fed now, or (unread) tokens
        (B,) on the GPU from a step not yet read, which each job feeds after the one it reads."""
        pages = -(-(max(job.get_max_seq_len() for job in jobs) + unread) // self.page_size)
        table = torch.zeros((len(jobs), pages), dtype=torch.int32)
        seqlens = torch.zeros((len(jobs),), dtype=torch.int32)
        for i, job in enumerate(jobs):
            sequence = job.sequences[0]
            index = job.get_block_index(sequence, len(sequence.sequence_ids) + unread)
            table[i, : index.shape[-1]].copy_(index)
            seqlens[i] = sequence.kv_position + unread
        rows = [
            sampling.row(job.gen_settings, job.rng.random(), job.sequences[0].sequence_ids.torch())
            for job in jobs
        ]
        with torch.cuda.stream(self.graphs.stream):
            logits = self.graphs.run(ids.view(-1, 1), table, seqlens)
            tokens, probs = sampling.sample(logits[:, 0], rows, self._vocab_size)
            (host_tokens, host_probs), done = self.graphs.to_host(tokens, probs)
        self.graph_steps += 1
        return _Step(list(jobs), tokens, host_tokens, host_probs, done)

    def _receive(self, step: _Step, results: list) -> None:
        """Each job takes its token as exllamav2's own step gives it; some may stop here."""
        step.done.synchronize()
        tokens, probs = step.host_tokens, step.host_probs
        remaining = self.num_remaining_jobs()
        for i, job in enumerate(step.jobs):
            if job is None or job not in self.active_jobs:  # dropped, or cancelled meanwhile
                continue
            token, prob = tokens[i].view(1, 1), probs[i].view(1, 1)
            eos, _ = job.receive_sample(None, token, None, None, prob, False, results, True)
            if eos:
                job.deallocate_pages()
                self.active_jobs.remove(job)
        if remaining and not self.num_remaining_jobs():
            self.defrag_cache()  # type: ignore[call-arg]  # exllamav2 decorates it bare

    def _feed(self, step: _Step) -> _Step:
        """After the tokens a look-ahead step fed were read: each job still running adds its token
        to the cache's bookkeeping as feeding it would have; the others' parts are dropped."""
        for i, job in enumerate(step.jobs):
            if job in self.active_jobs and self._on_fast_path(job):
                job.get_input_ids_list(add_to_cache=True)
            else:
                step.jobs[i] = None
        self.ahead_steps += 1
        return step
