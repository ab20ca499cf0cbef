"""Our EXL2 matmul inside the decode graphs, on loaded models (`-m gpu`): the same greedy tokens as
exllamav2's kernel up to the first near-tie, the same tokens every run even past near-ties, and a
load that names the matmul in use and keeps exllamav2's where ours is off."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)", allow_module_level=True)

from engine.inproc import InProcessEngine  # noqa: E402
from tests.engine.test_engine_gpu import PROMPT, greedy_ids, prompt_ids  # noqa: E402
from tests.engine.test_scheduler_gpu import CHUNK, TIE, loaded  # noqa: E402
from tests.fakes.schedules import Job, Outcome, Reference, mismatches  # noqa: E402

pytestmark = pytest.mark.gpu

# At least this many tokens come before their continuation's first near-tie (H100: 59 of 512 over
# the 8 prompts): a bound against a comparison that checks nothing, not a target. The scheduler
# test's share (COMPARED) is measured on random schedules and does not carry over to these prompts.
FLOOR = 32


def prompts(folder, count: int) -> list[list[int]]:
    return [prompt_ids(folder, PROMPT[i * 5 :] + f"# case {i}\n" * (i + 1)) for i in range(count)]


def test_greedy_tokens_with_our_matmul_equal_exllamav2s_up_to_the_first_near_tie(
    decisive_exl2_dir,
):
    """The decisive model keeps near-ties once quantized (a quarter of a random schedule's tokens,
    an eighth of these prompts', come before the first top-2 logit margin under TIE), where
    exllamav2's own atomics flip tokens too: each continuation is compared with exllamav2's eager
    one, alone, up to that margin."""
    cases = prompts(decisive_exl2_dir, 8)
    ours = greedy_ids(decisive_exl2_dir, cases, paged=True, decode="graph", matmul="ours")
    jobs = [Job(tuple(ids), len(ours[0]), arrive=0) for ids in cases]
    eager = loaded(decisive_exl2_dir, max_jobs=1, cuda_graphs=False)
    try:
        reference = Reference(eager.engine._generator, CHUNK)
        want = [reference(job) for job in jobs]
    finally:
        eager.close()
    # greedy_ids sets no stop condition: ours is read over the span the reference produced.
    got = [Outcome(tokens[: len(w.tokens)], w.reason) for tokens, w in zip(ours, want, strict=True)]
    problems, compared, total = mismatches(jobs, got, want, TIE["decisive-exl2"])
    print(f"decisive EXL2, our matmul: {compared}/{total} tokens before a near-tie compared")
    assert not problems, "\n".join(problems)
    assert compared >= FLOOR


def test_the_same_prompt_gets_the_same_tokens_alone_and_among_seven_others(exl2_dir):
    """The near-tied tiny model: exllamav2's split-K atomics reorder sums between runs; ours adds
    in a fixed order, so decode steps repeat bit for bit (prefill still takes exllamav2's)."""
    prompt = prompts(exl2_dir, 1)[0]
    others = prompts(exl2_dir, 8)[1:]
    runs = [greedy_ids(exl2_dir, [prompt], paged=True, decode="graph", matmul="ours")[0]]
    runs += [greedy_ids(exl2_dir, [prompt], paged=True, decode="graph", matmul="ours")[0]]
    for _ in range(3):
        runs.append(
            greedy_ids(exl2_dir, [prompt, *others], paged=True, decode="graph", matmul="ours")[0]
        )
    distinct = {tuple(run) for run in runs}
    print(f"near-tied EXL2, our matmul: {len(distinct)} distinct continuation(s) in 5 runs")
    assert len(distinct) == 1


@pytest.mark.parametrize("custom_matmul", [True, False])
def test_the_model_line_names_the_matmul_in_use(exl2_dir, custom_matmul):
    engine = InProcessEngine(max_jobs=4, custom_matmul=custom_matmul)
    status = engine.load(str(exl2_dir), max_seq_len=1024)
    engine.close()
    print(status.decode)
    if custom_matmul:
        assert "EXL2 matmul: ours for" in status.decode
    else:
        assert "EXL2 matmul: exllamav2's" in status.decode
