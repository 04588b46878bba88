"""The tiny model: a stock `Qwen2ForCausalLM`, so SGLang serves it with its native Qwen2 code.

The shape is chosen for the KV cache, not for language ability: GQA with 4 query heads per KV
head (a group size the project's kernels are tested with), head_dim 64 (a power of two, so the
Hadamard key transform and 32/64-wide quantization groups apply), RoPE theta 1e6 as in Qwen2.5,
and an 8K context. Qwen2 takes head_dim from the config, so heads * head_dim (512) need not
equal hidden_size (256); both transformers and SGLang's qwen2.py read `head_dim`.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from eval.tiny import tokenizer as tiny_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class TinySize:
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


SIZES = {
    # ~3.9M parameters (1.05M of them the tied 4096 x 256 embedding), ~7.9 MB in bf16.
    "base": TinySize(num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=64),
    # The bundled model: the same width, six layers (~5.4M parameters, ~10.8 MB in bf16); four
    # layers never learnt multikey (docs/results/tiny-training-2026-11-29-v2.md).
    "deep": TinySize(num_hidden_layers=6, hidden_size=256, intermediate_size=512,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=64),
    # For CPU smoke runs and tests: same structure (GQA 2), a few hundred thousand parameters.
    "toy": TinySize(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
ROPE_THETA = 1_000_000.0
MAX_POSITION_EMBEDDINGS = 8192


def tiny_config(vocab_size: int, eos_token_id: int, pad_token_id: int, size: str = "base",
                max_position_embeddings: int = MAX_POSITION_EMBEDDINGS) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        **asdict(SIZES[size]),
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        max_window_layers=SIZES[size].num_hidden_layers,
        bos_token_id=pad_token_id,  # as Qwen2: <|endoftext|>, never prepended
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        architectures=["Qwen2ForCausalLM"],
    )


def config_for_tokenizer(tokenizer_dir: Path, size: str = "base") -> Qwen2Config:
    tokenizer = tiny_tokenizer.load_tokenizer(tokenizer_dir)
    return tiny_config(
        vocab_size=tokenizer.get_vocab_size(),
        eos_token_id=tokenizer.token_to_id(tiny_tokenizer.EOS_TOKEN),
        pad_token_id=tokenizer.token_to_id(tiny_tokenizer.PAD_TOKEN),
        size=size,
    )


def build_model(config: Qwen2Config, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


def load_model(model_dir: Path) -> Qwen2ForCausalLM:
    """A saved folder back as an fp32 model to train further."""
    return Qwen2ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (the tied embedding once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model: Qwen2ForCausalLM, tokenizer_dir: Path, out_dir: Path) -> Path:
    """A folder SGLang and transformers load: config.json, bf16 model.safetensors, the tokenizer
    files and generation_config.json (stop on <|im_end|> or <|endoftext|>)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16_model.config.dtype = torch.bfloat16
    bf16_model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=[model.config.eos_token_id, model.config.pad_token_id],
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
    )
    bf16_model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).resolve() != (out_dir / name).resolve():
            shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    return out_dir


def saved_architecture(model_dir: Path) -> list[str]:
    return json.loads((Path(model_dir) / "config.json").read_text())["architectures"]
