"""A tiny random StarCoder2 with the real config keys and special tokens, built in seconds."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<repo_name>",
    "<file_sep>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
]

_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "### Instruction\nWrite a function that sorts a list.\n\n### Response\n",
    "You are an exceptionally intelligent coding assistant that consistently delivers accurate "
    "and reliable responses to user instructions.\n\n",
    "import numpy as np\nclass Vector:\n    def __init__(self, x, y):\n        self.x = x\n",
    "for i in range(10):\n    print(i * i)  # squares\nwhile True:\n    break\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ 你好 مرحبا\n",
]


def real_config(**overrides) -> dict:
    """config.json with exactly the keys of starcoder2-15b-instruct-v0.1, tiny dimensions."""
    config = {
        "architectures": ["Starcoder2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 512,
        "initializer_range": 0.02,
        "intermediate_size": 2048,
        "max_position_embeddings": 16384,
        "mlp_type": "default",
        "model_type": "starcoder2",
        "norm_epsilon": 1e-05,
        "norm_type": "layer_norm",
        "num_attention_heads": 8,
        "num_hidden_layers": 4,
        "num_key_value_heads": 2,
        "rope_theta": 100000,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_bias": True,
        "use_cache": True,
        "vocab_size": 49152,
    }
    config.update(overrides)
    return config


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer.json whose first ids are StarCoder2's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 20, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {
        str(i): {
            "content": token,
            "special": True,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "single_word": False,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    tokenizer_config = {
        "added_tokens_decoder": added,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "model_max_length": 16384,
        "tokenizer_class": "GPT2Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return tokenizer.get_vocab_size()


def write_weights(
    folder: Path,
    config: dict,
    tokens: int,
    seed: int = 0,
    mute_eos: bool = False,
    head_std: float = 0.15,
) -> None:
    """Random fp16 weights under StarCoder2's tensor names, with a separate (untied) lm_head."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    vocab = config["vocab_size"]

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=generator) * std).half()

    def norm(prefix):
        return {
            f"{prefix}.weight": (1 + rand(hidden, std=0.1).float()).half(),
            f"{prefix}.bias": rand(hidden, std=0.1),
        }

    # Larger-than-usual scales keep the logits decisive, so greedy tokens do not hinge on rounding.
    tensors = {"model.embed_tokens.weight": rand(vocab, hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors |= norm(f"{p}.input_layernorm") | norm(f"{p}.post_attention_layernorm")
        for name, rows in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            tensors[f"{p}.self_attn.{name}.weight"] = rand(rows, hidden, std=0.08)
            tensors[f"{p}.self_attn.{name}.bias"] = rand(rows, std=0.02)
        tensors[f"{p}.mlp.c_fc.weight"] = rand(ffn, hidden, std=0.05)
        tensors[f"{p}.mlp.c_fc.bias"] = rand(ffn, std=0.02)
        tensors[f"{p}.mlp.c_proj.weight"] = rand(hidden, ffn, std=0.03)
        tensors[f"{p}.mlp.c_proj.bias"] = rand(hidden, std=0.02)
    tensors |= norm("model.norm")
    tensors["lm_head.weight"] = rand(vocab, hidden, std=head_std)
    # Ids past the tiny tokenizer's vocabulary get zero logits: nobody picks a token with no text.
    tensors["lm_head.weight"][tokens:] = 0
    if mute_eos:  # benchmarks: keep random text from ending early
        tensors["lm_head.weight"][0] = 0
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def build_tiny_starcoder2(
    folder: Path,
    *,
    sliding_window: int = 4096,
    seed: int = 0,
    mute_eos: bool = False,
    head_std: float = 0.15,
    max_positions: int = 16384,
) -> Path:
    """Write a complete FP16 model folder (config, tokenizer, weights) and return it.

    A larger `head_std` spreads the logits, so greedy choices are decisive (no near-ties).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = real_config(sliding_window=sliding_window, max_position_embeddings=max_positions)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": 0})
    )
    tokens = write_tokenizer(folder)
    write_weights(folder, config, tokens, seed=seed, mute_eos=mute_eos, head_std=head_std)
    return folder


def quantize_exl2(
    source: Path,
    output: Path,
    work: Path,
    bits: float = 4.0,
    head_bits: int = 6,
    measurement: Path | None = None,
) -> Path:
    """Quantize with exllamav2's own converter (small calibration: well under a minute)."""
    import runpy
    import sys

    from engine.gpu import compat

    compat.apply_all()  # the converter reads the config too, and needs the norm_epsilon fix
    argv = sys.argv
    sys.argv = [
        "convert_exl2", "-i", str(source), "-o", str(work), "-cf", str(output), "-b", str(bits),
        "-hb", str(head_bits), "-r", "8", "-l", "256", "-mr", "4", "-ml", "256",
    ]  # fmt: skip
    if measurement is not None:
        sys.argv += ["-m", str(measurement)]
    try:
        runpy.run_module("exllamav2.conversion.convert_exl2", run_name="__main__")
    finally:
        sys.argv = argv
    return output
