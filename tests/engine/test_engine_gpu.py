"""The engine on a GPU, checked against transformers' Starcoder2ForCausalLM (`pytest -m gpu`)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)", allow_module_level=True)

from engine.api import Finished, TextDelta  # noqa: E402
from engine.gpu.engine import Engine  # noqa: E402
from engine.inproc import InProcessEngine  # noqa: E402
from starcoder2.prompt import Segment  # noqa: E402
from starcoder2.settings import SamplingSettings  # noqa: E402
from tests.fakes.prompts import ask  # noqa: E402

pytestmark = pytest.mark.gpu

PROMPT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
    "fibonacci(n - 2)\n\nclass Vector:\n    def __init__(self, x, y):\n        self.x = x\n"
    "for i in range(10):\n    print(i * i)  # squares\n"
) * 2


def reference(folder, dtype=None):
    from transformers import Starcoder2ForCausalLM

    model = Starcoder2ForCausalLM.from_pretrained(
        folder, dtype=dtype or torch.float32, attn_implementation="eager"
    )
    return model.cuda().eval()


def prompt_ids(folder, text=PROMPT) -> list[int]:
    from tokenizers import Tokenizer

    return [0] + Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids


def load_exllamav2(folder, max_seq_len=1024, *, no_graphs=False):
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    from engine.gpu import compat

    compat.apply_all()
    config = ExLlamaV2Config(str(folder))
    config.max_seq_len = max_seq_len
    config.no_graphs = no_graphs  # exllamav2's own graphs; ours need them off
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=max_seq_len, lazy=True)
    model.load_autosplit(cache)
    return model, cache


DECODE_PATHS = ["graph", "eager"]


def greedy_ids(
    folder,
    prompts: list[list[int]],
    *,
    paged: bool,
    decode="eager",
    new_tokens=64,
    max_seq_len=1024,
    cache_tokens=256 * 16,
    matmul="exllamav2",
) -> list[list[int]]:
    """Greedy continuations through the dynamic generator, all prompts queued at once.

    decode "graph": our generator, replaying a CUDA graph per batch size and sampling on the GPU;
    "eager": exllamav2's own. matmul "ours": the graphs take our EXL2 matmul for every layer.
    """
    from exllamav2 import ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    graphs = decode == "graph"
    model, cache = load_exllamav2(folder, max_seq_len=cache_tokens, no_graphs=graphs)
    args = dict(max_batch_size=16, paged=paged, max_seq_len=max_seq_len)
    if graphs:
        from engine.gpu.generator import Generator
        from engine.gpu.graphs import DecodeGraphs

        ours = None
        if matmul == "ours":
            from engine.gpu.decode_matmul import DecodeMatmul

            ours = DecodeMatmul.for_model(model, 16)
            ours.faster_only = False
        captured = DecodeGraphs(model, cache, 16, max_seq_len, 256, matmul=ours)
        captured.capture()
        generator = Generator(
            model, cache, ExLlamaV2Tokenizer(model.config), graphs=captured, **args
        )
    else:
        generator = ExLlamaV2DynamicGenerator(
            model, cache, ExLlamaV2Tokenizer(model.config), **args
        )
    jobs = []
    for ids in prompts:
        job = ExLlamaV2DynamicJob(
            input_ids=torch.tensor([ids]),
            max_new_tokens=new_tokens,
            stop_conditions=[],
            gen_settings=ExLlamaV2Sampler.Settings.greedy(),
        )
        generator.enqueue(job)
        jobs.append(job)
    out = {id(job): [] for job in jobs}
    while generator.num_remaining_jobs():
        for result in generator.iterate():
            if "token_ids" in result:
                out[id(result["job"])] += result["token_ids"][0].tolist()
    if graphs:
        # Every new token comes out of a decode step, and every decode step replayed a graph;
        # all but the first and last were enqueued before the previous step's tokens were read.
        assert generator.graph_steps >= new_tokens
        assert generator.ahead_steps >= new_tokens - 2 - len(prompts)
        if ours is not None:
            assert not ours.refused and not ours.fell_back, (ours.refused, ours.fell_back)
            assert all(ours.serves(batch) for batch in range(1, 17))
        captured.release()
    model.unload()
    return [out[id(job)] for job in jobs]


def reference_greedy(ref, ids: list[int], new_tokens=64) -> list[int]:
    tokens = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        out = ref.generate(
            tokens,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            min_new_tokens=new_tokens,
        )
    return out[0, len(ids) :].tolist()


# ---- compat fixes, one test each ----


def test_an_exl2_mlp_adds_each_intermediate_feature_its_own_bias(exl2_dir):
    """Fix 7: the load puts the up projection's columns in the down projection's input order;
    for a zero input, what it returns is the bias it adds, which must follow the columns."""
    from safetensors import safe_open

    (file,) = exl2_dir.glob("*.safetensors")
    model, _ = load_exllamav2(exl2_dir)
    try:
        with safe_open(str(file), "pt") as tensors:
            for index in range(model.config.num_hidden_layers):
                key = f"model.layers.{index}.mlp"
                order = torch.argsort(tensors.get_tensor(f"{key}.c_proj.q_invperm").long())
                bias = tensors.get_tensor(f"{key}.c_fc.bias").cuda()
                assert not torch.equal(order, torch.arange(len(order)))  # a real reordering
                up = model.modules_dict[f"{key}.c_fc"]
                added = up.forward(torch.zeros((1, 1, up.in_features), device="cuda").half())
                assert torch.equal(added[0, 0], bias[order.cuda()]), key
    finally:
        model.unload()


def file_order_reference(model, folder):
    """transformers' model of an EXL2 file: each quantized layer as exllamav2 reconstructs it
    from VRAM, put back in the file's feature order, with the file's own norms and biases."""
    from safetensors import safe_open
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    from tests.fakes.exl2_layers import quantized_layers

    (file,) = folder.glob("*.safetensors")
    with safe_open(str(file), "pt") as tensors:
        state = {
            k: tensors.get_tensor(k).float()
            for k in tensors.keys()
            if k.endswith((".weight", ".bias"))
        }
        for layer in quantized_layers(model):
            state[f"{layer.key}.weight"] = layer.get_weight_tensor_dq().float().cpu().T
        for index in range(model.config.num_hidden_layers):
            key = f"model.layers.{index}.mlp"
            order = torch.argsort(tensors.get_tensor(f"{key}.c_proj.q_invperm").long())
            up, down = state[f"{key}.c_fc.weight"], state[f"{key}.c_proj.weight"]
            state[f"{key}.c_fc.weight"] = torch.empty_like(up).index_copy_(0, order, up)
            state[f"{key}.c_proj.weight"] = torch.empty_like(down).index_copy_(1, order, down)
    config = Starcoder2Config.from_pretrained(folder)
    reference = Starcoder2ForCausalLM(config).float()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return reference.cuda().eval()


def test_exl2_prefill_logits_match_transformers_on_the_same_weights(exl2_dir):
    """The whole EXL2 path (its matmuls, the MLP's reordered features and their biases, fix 7)
    against transformers computing the very weights exllamav2 holds."""
    ids = prompt_ids(exl2_dir)
    model, cache = load_exllamav2(exl2_dir)
    try:
        reference = file_order_reference(model, exl2_dir)
        tokens = torch.tensor([ids])
        with torch.no_grad():
            ours = model.forward(tokens, cache, last_id_only=False).float().cuda()[0]
            theirs = reference(tokens.cuda()).logits.float()[0]
            half = reference.half()(tokens.cuda()).logits.float()[0]
    finally:
        model.unload()
    floor = (half - theirs).abs().max().item()
    delta = (ours - theirs).abs().max().item()
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * delta
    print(f"EXL2 vs transformers on its weights: max|d|={delta:.4f}, fp16 floor={floor:.4f}")
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])
    assert delta < max(0.05, 4 * floor)


def test_config_with_norm_epsilon_loads_without_editing_the_file(fp16_dir):
    from exllamav2 import ExLlamaV2Config

    from engine.gpu import compat

    before = hashlib.sha256((fp16_dir / "config.json").read_bytes()).hexdigest()
    assert "layer_norm_epsilon" not in json.loads((fp16_dir / "config.json").read_text())
    compat.apply_all()
    config = ExLlamaV2Config(str(fp16_dir))
    assert config.norm_eps == pytest.approx(1e-5)
    assert hashlib.sha256((fp16_dir / "config.json").read_bytes()).hexdigest() == before


@pytest.mark.parametrize("folder_fixture", ["fp16_dir", "windowed_dir"])
def test_unpaged_prefill_and_decode_logits_match_transformers(folder_fixture, request):
    folder = request.getfixturevalue(folder_fixture)
    ids = prompt_ids(folder)
    assert len(ids) > 100
    ref = reference(folder)
    model, cache = load_exllamav2(folder)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ours = model.forward(tokens, cache, last_id_only=False).float().cuda()[0]
        theirs = ref(tokens.cuda()).logits.float()[0]
        # Decode: feed the reference's greedy tokens one by one (teacher forcing).
        decode_ours, decode_theirs, seq = [], [], list(ids)
        for _ in range(16):
            next_id = (
                int(theirs[-1].argmax()) if not decode_theirs else int(decode_theirs[-1].argmax())
            )
            seq.append(next_id)
            decode_ours.append(
                model.forward(torch.tensor([[next_id]]), cache).float().cuda()[0, -1]
            )
            decode_theirs.append(ref(torch.tensor([seq], device="cuda")).logits.float()[0, -1])
        # The floor: the same reference computed in fp16, as exllamav2 computes.
        half = reference(folder, torch.float16)(tokens.cuda()).logits.float()[0]
    model.unload()
    floor = (half - theirs).abs().max().item()
    prefill_delta = (ours - theirs).abs().max().item()
    decode_delta = (torch.stack(decode_ours) - torch.stack(decode_theirs)).abs().max().item()
    top2 = theirs.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * prefill_delta  # positions that are not near-ties
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(
        f"{folder.name}: prefill max|d|={prefill_delta:.4f} decode max|d|={decode_delta:.4f} "
        f"fp16-reference floor={floor:.4f} argmax agreement={agreement:.3f} "
        f"logit std={theirs.std().item():.2f}"
    )
    assert torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])
    assert prefill_delta < max(0.01, 2 * floor)
    assert decode_delta < max(0.01, 2 * floor)


# Random tiny models have near-ties that fp16 rounding can flip (the fp16 reference itself differs
# from fp32 by ~0.06). A continuation counts as identical when every token we chose is the fp32
# reference's argmax, or within TIE of it; the printout says how many were exact argmaxes.
TIE = 0.15


def assert_greedy_matches(ref, prompt: list[int], ours: list[int], label: str) -> None:
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + ours], device="cuda")).logits.float()[0]
    steps = logits[len(prompt) - 1 : -1]
    chosen = steps.gather(1, torch.tensor(ours, device="cuda")[:, None])[:, 0]
    gaps = steps.max(-1).values - chosen
    exact = int((gaps == 0).sum())
    print(f"{label}: {exact}/{len(ours)} exact argmax, largest gap {gaps.max().item():.4f}")
    assert len(ours) == 64
    assert gaps.max().item() <= TIE


@pytest.mark.parametrize(
    ("paged", "decode"), [(True, "graph"), (True, "eager"), (False, "eager")],
    ids=["paged-graph", "paged-eager", "unpaged"],
)  # fmt: skip
@pytest.mark.parametrize("folder_fixture", ["fp16_dir", "windowed_dir"])
def test_greedy_continuations_match_transformers(folder_fixture, paged, decode, request):
    folder = request.getfixturevalue(folder_fixture)
    ids = prompt_ids(folder)
    ours = greedy_ids(folder, [ids], paged=paged, decode=decode)[0]
    assert_greedy_matches(reference(folder), ids, ours, f"{folder.name} paged={paged} {decode}")


@pytest.mark.parametrize("decode", DECODE_PATHS)
def test_eight_prompts_batched_equal_each_run_alone(fp16_dir, decode):
    texts = [PROMPT[i * 7 :] + f"# variant {i}\n" * (i + 1) for i in range(8)]
    prompts = [prompt_ids(fp16_dir, text) for text in texts]
    together = greedy_ids(fp16_dir, prompts, paged=True, decode=decode)
    alone = [greedy_ids(fp16_dir, [p], paged=True, decode=decode)[0] for p in prompts]
    assert together == alone
    ref = reference(fp16_dir)
    for i, (prompt, ours) in enumerate(zip(prompts, together, strict=True)):
        assert_greedy_matches(ref, prompt, ours, f"batched prompt {i}")


# ---- the engine: streaming, cache modes, cancel, reload ----


def instruction(text: str) -> list[Segment]:
    from starcoder2.prompt import prompt_segments

    return prompt_segments([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def engine():
    engine = InProcessEngine()
    yield engine
    engine.close()


@pytest.mark.parametrize("cache_mode", ["fp16", "q8", "q6", "q4"])
def test_exl2_model_streams_in_every_cache_mode(engine, exl2_dir, cache_mode):
    status = engine.load(str(exl2_dir), max_seq_len=2048, cache_mode=cache_mode)
    assert status.state == "ready" and status.batching == "paged"
    events = list(ask(engine, instruction("Write a sort."), SamplingSettings(max_new_tokens=24)))
    assert isinstance(events[-1], Finished)
    assert all(isinstance(e, TextDelta) for e in events[:-1])
    final = events[-1]
    assert final.text == "".join(e.text for e in events[:-1])
    assert final.new_tokens >= 1 and final.prompt_tokens > 20
    assert final.stop_reason in {"eos", "stop_string", "max_new_tokens"}


def test_user_text_cannot_inject_an_end_of_text_token(engine, exl2_dir):
    engine.load(str(exl2_dir), max_seq_len=2048)
    plain = engine.encode(instruction("a b"))
    injected = engine.encode(instruction("a <|endoftext|> b"))
    assert plain.count(0) == injected.count(0) == 1  # only the template's own leading token


def test_seed_makes_sampling_repeatable(engine, fp16_dir):
    # FP16 weights: EXL2 matmuls reduce with atomics, so their sampled text may drift by a token.
    engine.load(str(fp16_dir), max_seq_len=2048)
    settings = SamplingSettings(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=32, seed=7)
    runs = [list(ask(engine, instruction("Hi"), settings))[-1].text for _ in range(2)]
    other = list(
        ask(engine, instruction("Hi"), SamplingSettings(temperature=1.5, max_new_tokens=32, seed=8))
    )[-1].text
    assert runs[0] == runs[1]
    assert other != runs[0]


def test_closing_the_stream_cancels_the_job_and_the_next_one_runs(engine, exl2_dir):
    engine.load(str(exl2_dir), max_seq_len=2048)
    stream = ask(engine, instruction("Count"), SamplingSettings(max_new_tokens=1500))
    for _ in range(3):
        assert isinstance(next(stream), TextDelta)
    stream.close()
    deadline = time.monotonic() + 1.0
    while engine.engine._generator.num_remaining_jobs() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.engine._generator.num_remaining_jobs() == 0
    events = list(ask(engine, instruction("Next"), SamplingSettings(max_new_tokens=8)))
    assert isinstance(events[-1], Finished)


def test_reload_with_other_context_and_cache_returns_vram_to_baseline(engine, exl2_dir):
    engine.engine.unload()
    total = torch.cuda.mem_get_info()[1]
    baseline = torch.cuda.mem_get_info()[0]
    engine.load(str(exl2_dir), max_seq_len=2048, cache_mode="fp16")
    loaded = torch.cuda.mem_get_info()[0]
    engine.load(str(exl2_dir), max_seq_len=4096, cache_mode="q4")
    list(ask(engine, instruction("x"), SamplingSettings(max_new_tokens=8)))
    engine.load(str(exl2_dir), max_seq_len=2048, cache_mode="fp16")
    assert abs(torch.cuda.mem_get_info()[0] - loaded) < 0.02 * total
    engine.engine.unload()
    assert abs(torch.cuda.mem_get_info()[0] - baseline) < 0.02 * total


def test_load_reports_progress_per_module_and_refuses_what_does_not_fit(exl2_dir, monkeypatch):
    from engine.gpu.engine import GpuInfo
    from starcoder2.errors import DoesNotFit

    engine = Engine()
    steps = []
    engine.load(str(exl2_dir), max_seq_len=1024, on_progress=steps.append)
    engine.unload()
    assert steps[-1].stage == "graphs"  # captured after the layers, before the engine is ready
    progress = [(step.done, step.total) for step in steps if step.stage == "layers"]
    total = progress[-1][1]
    assert progress[-1] == (total, total) and total >= 4 * 2 + 3  # attn+mlp per layer, embed, head
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    monkeypatch.setattr(engine, "gpu_info", lambda: GpuInfo("small", 8.0, 0.3))
    with pytest.raises(DoesNotFit, match=r"0\.3 GB is free; lower the context"):
        engine.load(str(exl2_dir), max_seq_len=16384)
    assert engine.status.state == "failed"


BROKEN_XFORMERS = """
import sys, types
ops = types.ModuleType("xformers.ops")
def memory_efficient_attention(*args, **kwargs):
    raise NotImplementedError("No operator found for `memory_efficient_attention_forward`")
ops.memory_efficient_attention = memory_efficient_attention
fmha = types.ModuleType("xformers.ops.fmha"); bias = types.ModuleType("xformers.ops.fmha.attn_bias")
bias.LowerTriangularFromBottomRightMask = object
pkg = types.ModuleType("xformers"); pkg.ops = ops
sys.modules.update({"xformers": pkg, "xformers.ops": ops, "xformers.ops.fmha": fmha,
                    "xformers.ops.fmha.attn_bias": bias})
import exllamav2.attn
assert exllamav2.attn.has_xformers  # exllamav2 would route attention through it
from engine.api import GenerationRequest
from engine.inproc import InProcessEngine
from starcoder2.prompt import prompt_segments
from starcoder2.settings import SamplingSettings
engine = InProcessEngine(paged=False)
engine.load(sys.argv[1], max_seq_len=1024)
ids = tuple(engine.encode(prompt_segments([{"role": "user", "content": "hi"}])))
events = list(engine.stream(GenerationRequest(ids, SamplingSettings(max_new_tokens=8))))
print("new tokens", events[-1].new_tokens)
"""


def test_an_installed_but_broken_xformers_is_never_used(exl2_dir, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "broken_xformers.py"
    script.write_text(BROKEN_XFORMERS)
    done = subprocess.run(
        [sys.executable, str(script), str(exl2_dir)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "new tokens" in done.stdout
