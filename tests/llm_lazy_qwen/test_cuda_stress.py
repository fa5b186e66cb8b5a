"""CUDA copy mode under asynchrony (issue 15 item 18; run on a GPU machine, skipped elsewhere).

A lazy part streams each layer / head chunk to the device on a side stream while the compute stream
runs the layer before. If a retired layer's device blocks went back to the allocator while its kernels
were still queued, the next prefetch would overwrite them and the logits would be wrong; if a pinned
host buffer were refilled while the copy out of it is in flight, the same. So: a model with many
layers and a long prefill (kernels queued long), and a variant that stalls the compute stream before
every layer (``torch.cuda._sleep``) so that the host and the copies run far ahead of the kernels; every
logit must equal the same part fully in VRAM, 20 times in a row, for prefetch 1 and 2, fp32 and bf16.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import llm_sepweight as sw
from llm_lazy_qwen import QwenPart, load_part

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RUNS = 20
SEQ = 1024  # a long prefill: each layer queues long kernels
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2}}
_STALL_CYCLES = 2_000_000  # ~1 ms of GPU clock: the compute stream lags the host by a layer or more


@pytest.fixture(scope="module")
def deep_sep(tmp_path_factory) -> str:
    """A 12-layer Qwen2 (hidden 512, vocab 4096; ~150 MB fp32) written by transformers, as sepweight."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    root = tmp_path_factory.mktemp("deep")
    cfg = Qwen2Config(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random biases and norm weights: default init hides bugs
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(root / "hf")
    sw.convert(root / "hf", root / "sep", progress=False)
    return str(root / "sep")


def _stalled_forward(part: QwenPart, ids: torch.Tensor) -> torch.Tensor:
    """``part(ids)`` with the compute stream stalled before every layer and the head."""
    h, step = part.prepare(ids)
    for i in part.layer_ids:
        torch.cuda._sleep(_STALL_CYCLES)
        h = part.run_layer(i, h, step)
    torch.cuda._sleep(_STALL_CYCLES)
    return part.finish(h, step)


def _resident(mb: float) -> dict[str, float]:
    return {"resident_mb": mb} if mb and "resident_mb" in inspect.signature(load_part).parameters else {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("prefetch", "resident_mb"),
    [(1, 0.0), (2, 0.0), (1, 40.0)],
    ids=["prefetch1", "prefetch2", "prefetch1-resident"],
)
def test_lazy_copy_mode_equals_in_vram_under_load(deep_sep, dtype, prefetch, resident_mb):
    ids = torch.randint(0, 4096, (2, SEQ), generator=torch.Generator().manual_seed(0)).cuda()
    ref = load_part(deep_sep, device="cuda", dtype=dtype)
    with torch.no_grad():
        want = ref(ids)
    ref.close()
    del ref
    lazy = load_part(
        deep_sep,
        device="cuda",
        dtype=dtype,
        lazy=True,
        stream_mode="copy",
        prefetch=prefetch,
        head_chunk_size=1024,
        **_resident(resident_mb),
    )
    try:
        with torch.no_grad():
            for run in range(RUNS):
                for how, forward in (("plain", lazy), ("stalled", lambda x: _stalled_forward(lazy, x))):
                    got = forward(ids)
                    torch.testing.assert_close(
                        got, want, **TOL[dtype], msg=lambda m, run=run, how=how: f"run {run} ({how}): {m}"
                    )
    finally:
        lazy.close()


def test_side_stream_copies_are_ordered_before_use_on_another_stream(deep_sep):
    """The consumer may compute on a stream of its own: the weights must be ready there too."""
    ids = torch.randint(0, 4096, (1, 256), generator=torch.Generator().manual_seed(1)).cuda()
    ref = load_part(deep_sep, device="cuda")
    with torch.no_grad():
        want = ref(ids)
    ref.close()
    lazy = load_part(deep_sep, device="cuda", lazy=True, stream_mode="copy", prefetch=2, head_chunk_size=1024)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.no_grad(), torch.cuda.stream(stream):
            got = [_stalled_forward(lazy, ids) for _ in range(5)]
        torch.cuda.current_stream().wait_stream(stream)
        for g in got:
            torch.testing.assert_close(g, want, **TOL[torch.float32])
    finally:
        lazy.close()
