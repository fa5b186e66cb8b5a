"""A lazy or budgeted part used first under torch.inference_mode, then with autograd: the tensors it keeps
(resident items, long-lived mappings) must not be inference tensors (the demo's chat-then-fine-tune hit this)."""

import pytest
import torch
from lazy_helpers import FP32, token_ids

from llm_lazy_qwen import load_part

WAYS = {
    "mmap": {"lazy": True, "stream_mode": "mmap"},
    "copy, resident": {"lazy": True, "stream_mode": "copy", "resident_mb": 1000},
    "budget": {"memory_budget": "1.4MB", "max_context": 32},
    "budget, all resident": {"memory_budget": "64MB", "max_context": 32},
}


@pytest.mark.parametrize("way", list(WAYS))
def test_a_part_used_in_inference_mode_still_backpropagates(sep, way):
    path, _ = sep("qwen2")
    part, ram = load_part(path, "f", **WAYS[way]), load_part(path, "f")
    ids = token_ids(batch=1, seq=5, seed=3)
    with torch.inference_mode():
        part(ids)  # first use: resident items and mappings are made here
        part(ids)
    grads = []
    for model in (part, ram):
        h, step = model.prepare(ids)
        x = h.detach().requires_grad_(True)
        out = x
        for i in model.layer_ids:
            out = model.run_layer(i, out, step)
        out.square().sum().backward()
        grads.append((out.detach(), x.grad))
    torch.testing.assert_close(grads[0], grads[1], **FP32)
    part.close()
