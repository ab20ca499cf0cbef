"""Engine parts that need no GPU: argument checks, folder checks, prompt encoding, no-GPU errors."""

import json
import sys
import time

import pytest
import torch

from engine.api import GenerationRequest
from engine.gpu.engine import Engine
from engine.inproc import InProcessEngine
from starcoder2.errors import ModelFolderInvalid, NoGPU, NotReady
from starcoder2.prompt import prompt_segments
from starcoder2.settings import SamplingSettings
from starcoder2.tokens import PromptEncoder


def test_loading_a_folder_that_is_not_starcoder2_fails_before_any_gpu_work(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    engine = Engine()
    monkeypatch.setattr(engine, "gpu_info", lambda: object())  # pretend a GPU exists
    with pytest.raises(ModelFolderInvalid, match="Starcoder2ForCausalLM"):
        engine.load(str(tmp_path))
    assert engine.status.state == "empty"


def test_typed_end_of_text_stays_plain_text_but_the_template_token_is_special(fp16_dir):
    encoder = PromptEncoder(fp16_dir / "tokenizer.json")
    ids = encoder.encode(prompt_segments([{"role": "user", "content": "a <|endoftext|> b"}]))
    assert ids[0] == 0  # the template's leading <|endoftext|>
    assert ids.count(0) == 1  # the typed one became ordinary text tokens
    assert all(token >= 16 for token in ids[1:])  # no <fim_*> or other special id either


def test_assistant_turns_end_with_the_real_end_of_text_token(fp16_dir):
    encoder = PromptEncoder(fp16_dir / "tokenizer.json")
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
    ]
    assert encoder.encode(prompt_segments(messages)).count(0) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_load_says_why_there_is_none_and_a_reply_is_refused_at_once(fp16_dir):
    engine = InProcessEngine()
    assert engine.gpu_info() is None
    with pytest.raises(NoGPU, match="No GPU to run the model"):
        engine.load(str(fp16_dir))
    with pytest.raises(NotReady, match="not ready"):
        engine.stream(GenerationRequest((0, 1), SamplingSettings()))
    assert "exllamav2" not in sys.modules


def test_loading_prepares_the_cuda_compiler_before_exllamav2_is_imported(fp16_dir, monkeypatch):
    from engine.gpu import toolchain
    from engine.gpu.engine import GpuInfo

    class Stop(Exception):
        pass

    seen = []

    def ensure_cuda_home():
        seen.append("exllamav2" in sys.modules)
        raise Stop

    monkeypatch.setattr(toolchain, "ensure_cuda_home", ensure_cuda_home)
    engine = Engine()
    monkeypatch.setattr(engine, "gpu_info", lambda: GpuInfo("fake", 80.0, 80.0))
    with pytest.raises(Stop):
        engine.load(str(fp16_dir))
    assert seen == [False]
    assert engine.status.state == "failed"


def test_the_cache_holds_every_jobs_context_capped_by_the_vram_left_after_weights(tmp_path):
    from types import SimpleNamespace

    from engine.gpu.loading import cache_tokens
    from starcoder2.errors import DoesNotFit

    with open(tmp_path / "model.safetensors", "wb") as weights:
        weights.truncate(8_000_000_000)  # sparse: 8 GB by size, nothing on disk
    config = SimpleNamespace(num_hidden_layers=40, num_key_value_heads=4, head_dim=128)
    # 40 GB free - 8 GB weights - 1.2 GB reserve = 30.8 GB; fp16 K/V is 81,920 bytes per token.
    assert cache_tokens(tmp_path, config, 16384, "fp16", 8, 40.0) == 8 * 16384
    assert cache_tokens(tmp_path, config, 16384, "fp16", 64, 40.0) == 375_808
    with pytest.raises(DoesNotFit, match="need about 10.5 GB but 9.0 GB is free"):
        cache_tokens(tmp_path, config, 16384, "fp16", 1, 9.0)


def test_a_first_start_reports_the_extension_compile_as_it_goes(tmp_path, monkeypatch):
    import types

    from engine.api import LoadStep
    from engine.gpu import loading, toolchain

    build = tmp_path / "exllamav2_ext"
    build.mkdir()
    (build / "ext_cache.o").touch()
    monkeypatch.setattr(toolchain, "ensure_cuda_home", lambda: None)
    monkeypatch.setattr(toolchain, "extension_build_dir", lambda: build)
    monkeypatch.setitem(sys.modules, "exllamav2", types.ModuleType("exllamav2"))
    steps = []
    loading.import_exllamav2(steps.append)
    assert steps[0] == LoadStep("compiling", 1, toolchain.EXTENSION_SOURCES)
    (build / "exllamav2_ext.so").touch()  # built: the next start says nothing about compiling
    steps.clear()
    loading.import_exllamav2(steps.append)
    assert steps == []


def test_the_build_watch_counts_compiled_files_until_stopped(tmp_path):
    from engine.gpu import toolchain

    seen = []
    stop = toolchain.watch_extension_build(tmp_path, lambda done, total: seen.append(done), 0.01)
    (tmp_path / "a.o").touch()
    (tmp_path / "b.o").touch()
    deadline = time.monotonic() + 5
    while 2 not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    stop()
    assert seen[0] == 0 and 2 in seen
