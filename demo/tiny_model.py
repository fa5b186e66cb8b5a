"""The demo's built-in model (no download): a small random Qwen2 and a BPE tokenizer trained on shipped text.

Used with ``--tiny`` / ``--quick`` (CI) and when the real model cannot be fetched. The tokenizer carries
a ChatML chat template, so every step renders prompts with the model's own template on both paths.
"""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen's template without its default system message
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_checkpoint(path: Path, quick: bool) -> Path:
    """A small random Qwen2 + a BPE tokenizer trained on demo/data/corpus.txt, in HF's layout (fixed seed)."""
    if (path / "config.json").exists():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(DATA / "corpus.txt")], trainer)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128 if quick else 256,
        intermediate_size=256 if quick else 512,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        # wider random init than HF's 0.02: random features a small LoRA can learn from in seconds
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
    Qwen2ForCausalLM(config).save_pretrained(path)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    fast.save_pretrained(path)
    return path
