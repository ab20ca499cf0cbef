"""Our EXL2 matmul inside the decode graphs, on loaded models (`-m gpu`): the same greedy tokens as
exllamav2's kernel where logits are decisive, the same tokens every time where they are not, and a
load that names the matmul in use and keeps exllamav2's where ours is off."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)", allow_module_level=True)

from engine.inproc import InProcessEngine  # noqa: E402
from tests.engine.test_engine_gpu import PROMPT, greedy_ids, prompt_ids  # noqa: E402

pytestmark = pytest.mark.gpu


def prompts(folder, count: int) -> list[list[int]]:
    return [prompt_ids(folder, PROMPT[i * 5 :] + f"# case {i}\n" * (i + 1)) for i in range(count)]


def test_greedy_tokens_with_our_matmul_equal_exllamav2s_on_the_decisive_exl2_model(
    decisive_exl2_dir,
):
    cases = prompts(decisive_exl2_dir, 8)
    theirs = greedy_ids(decisive_exl2_dir, cases, paged=True, decode="graph")
    ours = greedy_ids(decisive_exl2_dir, cases, paged=True, decode="graph", matmul="ours")
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"decisive EXL2: {same}/8 continuations identical with our matmul")
    assert ours == theirs


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
