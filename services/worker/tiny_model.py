"""Build the tiny Mixtral checkpoint Shoal runs in tests, `make run` and benchmarks.

Random weights from `transformers` with a fixed seed, a byte-level tokenizer
built with `tokenizers` and a chat template: no download, the same bytes on
every machine. 4 layers, hidden 256, 8 experts, top-2 (about 13.5M weights).
Variant "b" is a different model on purpose (make run serves both behind one
router): 4 experts, a larger vocabulary, and its byte tokens at other ids, so
the same text tokenizes differently.

Usage: python -m services.worker.tiny_model OUT_DIR [--variant a|b] [--seed N] [--force]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.openai.tokens import byte_level_chars

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]


@dataclass(frozen=True)
class TinyVariant:
    # Ids below byte_offset are special tokens (and room for more); the 256 bytes follow.
    byte_offset: int = 16
    vocab_size: int = 320  # room to spare, as real vocabularies have
    experts: int = 8
    top_k: int = 2


VARIANTS = {
    "a": TinyVariant(),
    "b": TinyVariant(byte_offset=40, vocab_size=416, experts=4),
    # Eight experts per token, as DeepSeek- and Qwen3-style routers choose: the order in which an
    # expert-parallel instance sums their outputs matters, unlike with two.
    "top8": TinyVariant(experts=16, top_k=8),
}


def build_tokenizer(out: Path, byte_offset: int = 16) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = byte_level_chars()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({byte_chars[byte]: byte_offset + byte for byte in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build_tiny_model(out: Path, seed: int = 0, num_layers: int = 4, variant: TinyVariant = VARIANTS["a"]) -> Path:
    """Write the checkpoint and tokenizer into `out` and return it."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    config = MixtralConfig(
        vocab_size=variant.vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=variant.experts,
        num_experts_per_tok=variant.top_k,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    model.eval()  # type: ignore[no-untyped-call]
    model.save_pretrained(out)
    build_tokenizer(out, variant.byte_offset)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Build Shoal's tiny random-weight MoE checkpoint.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="a")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds a model")
    args = parser.parse_args(argv)
    if (args.out / "config.json").exists() and not args.force:
        print(f"{args.out} already holds a model (use --force to rebuild)")
        return
    build_tiny_model(args.out, seed=args.seed, variant=VARIANTS[args.variant])
    print(f"tiny model written to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
