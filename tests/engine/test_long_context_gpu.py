"""Contexts past the 16,384 trained positions, up to 32,768, against transformers (`-m gpu`).

The model has StarCoder2's 4,096-token sliding window and a config whose max_position_embeddings
is raised to 32,768 (transformers reads it; our engine is told the context at load). Random prompts
of 16k to 32k tokens, some ending at page boundaries, decode together with short ones, on the graph
path with look-ahead as the app runs it.
"""

from __future__ import annotations

import random
import threading

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)", allow_module_level=True)

from engine.api import Finished, GenerationRequest  # noqa: E402
from engine.inproc import InProcessEngine  # noqa: E402
from starcoder2.branches import MAX_CONTEXT  # noqa: E402
from starcoder2.settings import SamplingSettings  # noqa: E402
from tests.engine.test_engine_gpu import TIE, greedy_ids, reference  # noqa: E402
from tests.fakes.tiny_starcoder2 import build_tiny_starcoder2  # noqa: E402

pytestmark = pytest.mark.gpu

NEW_TOKENS = 64
# Prompt lengths: just past the trained length, page boundaries (256·k - 1, 256·k, 256·k + 1), and
# as long as the context allows with room for the answer.
LONG_PROMPTS = (16_385, 20_479, 24_576, 28_673, MAX_CONTEXT - NEW_TOKENS)
SHORT_PROMPTS = (40, 700, 3_000)


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    # The usual head, for which the near-tie rule (TIE) was set: its logits are 10x smaller than
    # the decisive model's, and so are their fp16 rounding differences.
    folder = tmp_path_factory.mktemp("tiny") / "long"
    return build_tiny_starcoder2(folder, max_positions=MAX_CONTEXT)


def random_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [0] + [rng.randrange(16, 1200) for _ in range(length - 1)]  # no special tokens


def reference_logits(ref, ids: list[int], last: int) -> torch.Tensor:
    """fp32 logits at the last `last` positions of ids, prefilled 2,048 tokens at a time through
    transformers' own cache (a single 32k-token eager forward would need tens of GB)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.config)
    kept = []
    with torch.no_grad():
        for start in range(0, len(ids), 2048):
            chunk = torch.tensor([ids[start : start + 2048]], device="cuda")
            logits = ref(chunk, past_key_values=cache, use_cache=True).logits.float()[0]
            first = max(0, len(ids) - last - start)
            if first < logits.shape[0]:
                kept.append(logits[first:])
    return torch.cat(kept)


def test_greedy_tokens_at_positions_16k_to_32k_match_transformers_among_other_jobs(long_dir):
    prompts = [random_prompt(n, seed=n) for n in (*LONG_PROMPTS, *SHORT_PROMPTS)]
    pages = sum(-(-(len(ids) + NEW_TOKENS) // 256) for ids in prompts)
    answers = greedy_ids(
        long_dir, prompts, paged=True, decode="graph", new_tokens=NEW_TOKENS,
        max_seq_len=MAX_CONTEXT, cache_tokens=256 * pages,
    )  # fmt: skip
    ref = reference(long_dir)
    for ids, answer in zip(prompts, answers, strict=True):
        assert len(answer) == NEW_TOKENS
        steps = reference_logits(ref, ids + answer[:-1], NEW_TOKENS)
        chosen = steps.gather(1, torch.tensor(answer, device="cuda")[:, None])[:, 0]
        gaps = steps.max(-1).values - chosen
        exact = int((gaps == 0).sum())
        print(f"prompt {len(ids):,}: {exact}/{NEW_TOKENS} exact argmax, gap {gaps.max():.4f}")
        assert gaps.max().item() <= TIE, f"prompt of {len(ids):,} tokens"


def test_the_engine_loads_a_32k_context_and_streams_a_30k_token_prompt_among_other_jobs(long_dir):
    engine = InProcessEngine(max_jobs=8, cuda_graphs=True)
    status = engine.load(str(long_dir), max_seq_len=MAX_CONTEXT)
    assert status.state == "ready" and status.max_seq_len == MAX_CONTEXT
    assert status.cache_tokens >= MAX_CONTEXT
    prompts = [random_prompt(n, seed=n) for n in (30_000, *SHORT_PROMPTS)]
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS)
    results: dict[int, Finished] = {}

    def run(index: int) -> None:
        events = list(engine.stream(GenerationRequest(tuple(prompts[index]), settings)))
        results[index] = events[-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    engine.close()
    assert sorted(results) == list(range(len(prompts)))
    for index, ids in enumerate(prompts):
        done = results[index]
        assert isinstance(done, Finished), done
        assert (done.prompt_tokens, done.new_tokens) == (len(ids), NEW_TOKENS)
