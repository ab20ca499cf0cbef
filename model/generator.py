"""exllamav2's dynamic generator with its decode steps on the GPU: a CUDA graph, then GPU sampling.

A step in which every job decodes one token with settings the GPU sampler has (model/sampling.py)
replays the graph for its batch size, samples every job's token on the GPU and reads the tokens
back in one copy. Each job then takes its token as exllamav2's own step would give it (stop
strings, text, pages). Any other step (draft models, filters, a batch size with no graph) is
exllamav2's.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import torch
from exllamav2.generator import ExLlamaV2DynamicGenerator
from exllamav2.util import cuda_sync_active

from model import sampling
from model.graphs import DecodeGraphs


class Generator(ExLlamaV2DynamicGenerator):
    def __init__(self, *args: Any, graphs: DecodeGraphs, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.graphs = graphs
        self.graph_steps = 0  # decode steps that replayed a graph
        self._vocab_size = self.tokenizer.get_vocab_size()
        # Whether each job's settings are the GPU sampler's: read once per job, not per token.
        self._gpu_sampled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _on_fast_path(self, job: Any) -> bool:
        """One sequence, one token to feed, nothing exllamav2's sampler alone can do."""
        if job not in self._gpu_sampled:
            self._gpu_sampled[job] = (
                len(job.sequences) == 1
                and not job.filters
                and not job.embeddings
                and not job.return_logits
                and not job.return_top_tokens
                and sampling.supports(job.gen_settings)
            )
        sequence = job.sequences[0]
        return (
            self._gpu_sampled[job]
            and len(sequence.sequence_ids) - sequence.kv_position == 1
            and not job.checkpoint
            and job.new_tokens >= job.min_new_tokens
        )

    def iterate_gen(self, results: list, draft_tokens: torch.Tensor | None = None) -> None:
        jobs = [job for job in self.active_jobs if job.is_prefill_done()]
        if (
            draft_tokens is not None
            or self.current_loras
            or not self.graphs.covers(len(jobs))
            or not all(self._on_fast_path(job) for job in jobs)
        ):
            super().iterate_gen(results, draft_tokens)
            return

        pages = -(-max(job.get_max_seq_len() for job in jobs) // self.page_size)
        table = torch.zeros((len(jobs), pages), dtype=torch.int32)
        seqlens = torch.zeros((len(jobs),), dtype=torch.int32)
        ids = []
        for i, job in enumerate(jobs):
            sequence = job.sequences[0]
            index = job.get_block_index(sequence, len(sequence.sequence_ids))
            table[i, : index.shape[-1]].copy_(index)
            seqlens[i] = sequence.kv_position
            if job.time_first_token is None:
                cuda_sync_active()
                job.time_first_token = time.time()
            ids += job.get_input_ids_list(add_to_cache=True)

        rows = [
            sampling.row(job.gen_settings, job.rng.random(), job.sequences[0].sequence_ids.torch())
            for job in jobs
        ]
        with torch.cuda.stream(self.graphs.stream):
            logits = self.graphs.run(torch.cat(ids, dim=0), table, seqlens)
            tokens, probs = sampling.sample(logits[:, 0], rows, self._vocab_size)
            tokens, probs = tokens.cpu(), probs.cpu()
        self.graph_steps += 1

        remaining = self.num_remaining_jobs()
        for i, job in enumerate(jobs):
            token, prob = tokens[i].view(1, 1), probs[i].view(1, 1)
            eos, _ = job.receive_sample(None, token, None, None, prob, False, results, True)
            if eos:
                job.deallocate_pages()
                self.active_jobs.remove(job)
        if remaining and not self.num_remaining_jobs():
            self.defrag_cache()  # type: ignore[call-arg]  # exllamav2 decorates it bare
