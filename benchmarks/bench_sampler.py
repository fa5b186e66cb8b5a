"""llm_sampler: tokens/s of `sample` over a KV-cached transformers model vs transformers' own `generate`,
and the speed-up of `speculative_sample` with a smaller draft model.

Models are random Qwen2s built in-process (no download). `sample` vs `generate`: hidden 256, 4 layers,
vocab 4096. Anchors are measured in the same run, interleaved with what they anchor (ours, anchor, ours,
...), after one warm-up each; the tables report medians. Threads are pinned with torch.set_num_threads(2).

Speculative decoding uses a larger target (hidden 512, 8 layers, vocab 4096). A random model's outputs are
chaotic, so a truncated copy of it would rarely agree with it; the pair is made correlated on purpose: the
draft is the target's embedding, first layer, final norm and head, and the target's layers 1..7 keep their
weights but have their residual outputs (o_proj, down_proj) scaled by 0.05, so they nudge rather than
replace the draft's prediction. Acceptance is a property of the pair, so the table prints it next to the
speed-up.

    python benchmarks/bench_sampler.py [--rounds 5] [--new-tokens 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from llm_sampler import (
    CachedForward,
    SpeculativeStats,
    TransformersIncremental,
    pad_left,
    sample,
    speculative_sample,
)

VOCAB = 4096


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int

    def __str__(self) -> str:
        return f"hidden {self.hidden}, {self.layers} layers, vocab {VOCAB}"


GENERATE_MODEL = Shape(hidden=256, layers=4)
TARGET = Shape(hidden=512, layers=8)
DRAFT_LAYERS, RESIDUAL_SCALE, NUM_DRAFT = 1, 0.05, 4


def build(shape: Shape, num_layers: int | None = None) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=shape.hidden,
        intermediate_size=4 * shape.hidden,
        num_hidden_layers=num_layers or shape.layers,
        num_attention_heads=shape.hidden // 64,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    std = 0.06 * (256 / shape.hidden) ** 0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.06 if "lm_head" in name else std)
    return model


def speculative_pair() -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM]:
    target = build(TARGET)
    with torch.no_grad():
        for layer in target.model.layers[DRAFT_LAYERS:]:
            layer.self_attn.o_proj.weight.mul_(RESIDUAL_SCALE)
            layer.mlp.down_proj.weight.mul_(RESIDUAL_SCALE)
    draft = build(TARGET, num_layers=DRAFT_LAYERS)
    # drops layers >= DRAFT_LAYERS
    draft.load_state_dict(target.state_dict(), strict=False)
    return target, draft


def hf_config(new_tokens: int, settings: dict) -> GenerationConfig:
    # transformers fills None with its defaults (top_k=50): state every processor explicitly.
    greedy = settings.get("temperature", 1.0) == 0
    base = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    chosen = {k: v for k, v in settings.items() if not (greedy and k == "temperature")}
    return GenerationConfig(
        **{**base, **chosen},
        do_sample=not greedy,
        max_new_tokens=new_tokens,
        pad_token_id=0,
        eos_token_id=None,
    )


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each run over `rounds`, alternating between them; one warm-up each first."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_generate(rounds: int, new_tokens: int, device: str) -> list[str]:
    model = build(GENERATE_MODEL).to(device)
    prompts = torch.randint(1, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = [p[:n].tolist() for p, n in zip(prompts, [32, 20, 9, 27], strict=True)]
    padded, mask = pad_left(rows, 0)
    sampled = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
    cases = [
        ("greedy, batch 1", prompts[:1], None, {"temperature": 0}),
        ("T=0.8 top_k=50 top_p=0.95, batch 1", prompts[:1], None, sampled),
        ("greedy, batch 4 left-padded", padded, mask, {"temperature": 0}),
    ]
    lines = []
    for label, ids, attention, settings in cases:
        ids = ids.to(device)
        attention = None if attention is None else attention.to(device)
        hf_mask = torch.ones_like(ids) if attention is None else attention
        config = hf_config(new_tokens, settings)

        def ours(ids=ids, attention=attention, settings=settings) -> object:
            cached = CachedForward(TransformersIncremental(model))
            return sample(cached, ids, new_tokens, attention_mask=attention, **settings)

        def theirs(ids=ids, hf_mask=hf_mask, config=config) -> object:
            with torch.no_grad():
                return model.generate(ids, attention_mask=hf_mask, generation_config=config)

        seconds = interleaved({"ours": ours, "hf": theirs}, rounds)
        tokens = ids.shape[0] * new_tokens
        lines.append(
            f"| {label} | {tokens / seconds['ours']:.0f} | {tokens / seconds['hf']:.0f} "
            f"| **{seconds['hf'] / seconds['ours']:.2f}** |"
        )
    return lines


def bench_speculative(rounds: int, new_tokens: int, device: str) -> list[str]:
    target, draft = (m.to(device) for m in speculative_pair())
    prompt = torch.randint(1, VOCAB, (1, 32), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    lines = []
    for label, settings in [
        ("greedy", {"temperature": 0}),
        ("T=1", {"temperature": 1.0}),
    ]:
        stats: list[SpeculativeStats] = []

        def plain(settings=settings) -> object:
            cached = CachedForward(TransformersIncremental(target))
            return sample(cached, prompt, new_tokens, **settings)

        def speculative(settings=settings, stats=stats) -> object:
            out = speculative_sample(
                CachedForward(TransformersIncremental(target)),
                CachedForward(TransformersIncremental(draft)),
                prompt,
                new_tokens,
                num_draft_tokens=NUM_DRAFT,
                **settings,
            )
            stats.append(out.stats)
            return out

        seconds = interleaved({"plain": plain, "speculative": speculative}, rounds)
        accepted = sum(s.accepted for s in stats) / sum(s.proposed for s in stats)
        per_call = sum(s.generated for s in stats) / sum(s.target_calls for s in stats)
        lines.append(
            f"| {label} | {accepted:.2f} | {per_call:.2f} "
            f"| {new_tokens / seconds['plain']:.0f} | {new_tokens / seconds['speculative']:.0f} "
            f"| **{seconds['plain'] / seconds['speculative']:.2f}** |"
        )
    return lines


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(2)
    before = loadavg()
    generate_rows = bench_generate(args.rounds, args.new_tokens, args.device)
    speculative_rows = bench_speculative(args.rounds, args.new_tokens, args.device)
    after = loadavg()

    command = f"python benchmarks/bench_sampler.py --rounds {args.rounds} --new-tokens {args.new_tokens}"
    if args.device != "cpu":
        command += f" --device {args.device}"
    print(
        f"`{command}`: {args.device}, torch threads 2, load average before {before} and after {after}; "
        f"median of {args.rounds} interleaved runs after one warm-up each."
    )
    print()
    print(
        f"`sample` over `CachedForward(TransformersIncremental(model))` vs `model.generate` with the same "
        f"processors; random Qwen2 ({GENERATE_MODEL}), fp32, 32-token prompts, {args.new_tokens} new tokens per row."
    )
    print()
    print("| settings | sample tok/s | generate tok/s | ratio (goal >= 1.0) |")
    print("|---|---|---|---|")
    print("\n".join(generate_rows))
    print()
    print(
        f"`speculative_sample`, batch 1, {NUM_DRAFT} draft tokens per round, vs `sample` with the cached target "
        f"alone. Target: random Qwen2 ({TARGET}); draft: its embedding, layer 0 and head (see the script for how "
        f"the pair is correlated)."
    )
    print()
    print("| settings | acceptance rate | tokens per target call | sample tok/s | speculative tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    print("\n".join(speculative_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
