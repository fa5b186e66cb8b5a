"""The layer-wise engine: gradients and loss equal one full autograd graph, PEFT + transformers, F.cross_entropy."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from sft_helpers import (
    ALL7,
    FP32,
    assert_grads_close,
    examples,
    full_graph_loss_sum,
    grads,
    lora_part,
)

from llm_lazy_qwen import load_part
from llm_sft import LayerwiseEngine, chunked_cross_entropy, collate

LAZY = {"prefetch": 0}, {"prefetch": 2}, {"prefetch": 2, "stream_mode": "mmap"}


@pytest.mark.parametrize(
    "load, dropout, train_norm",
    [
        (None, 0.0, False),
        (None, 0.3, True),
        (LAZY[0], 0.3, False),
        (LAZY[1], 0.3, False),
        (LAZY[2], 0.0, False),
    ],
    ids=[
        "ram",
        "ram-dropout-norm",
        "lazy-dropout",
        "lazy-prefetch-dropout",
        "lazy-prefetch-mmap",
    ],
)
def test_gradients_equal_full_graph_autograd(sep, load, dropout, train_norm):
    """Two micro-batches accumulated (the second one starts after a backward walk: a lazy part's
    prefetcher turns around twice); padded rows, so the attention mask and -100 labels matter."""
    path, _ = sep("qwen2")
    batches = [
        collate(examples((9, 6, 12)), pad_id=0),
        collate(examples((7, 10), seed=2), pad_id=0),
    ]
    total = sum(b.n_targets for b in batches)
    ref, part = (
        lora_part(path, dropout=dropout),
        lora_part(path, lazy=load is not None, dropout=dropout, **(load or {})),
    )
    for m in (ref, part):
        m.model.norm.weight.requires_grad_(train_norm)
    torch.manual_seed(7)  # the dropout masks
    want_loss = sum(float(_backward(full_graph_loss_sum(ref, b), total)) for b in batches)
    rng_after_reference = torch.get_rng_state()

    torch.manual_seed(7)
    engine = LayerwiseEngine(part)
    outs = [engine.forward_backward(b, normalizer=total) for b in batches]
    # the global RNG ends where a full-graph step leaves it: the next step draws the same masks too
    assert torch.equal(torch.get_rng_state(), rng_after_reference)
    assert outs[0].n_targets == batches[0].n_targets == (9 - 3) + (6 - 3) + (12 - 3)
    assert sum(o.loss_sum for o in outs) == pytest.approx(want_loss, rel=1e-6)
    got, want = grads(part), grads(ref)
    assert len(want) == 2 * 7 * 3 + train_norm
    assert_grads_close(got, want)
    if load is not None:
        assert part.get_submodule("model.layers.1.self_attn.q_proj.base_layer").weight.is_meta  # released
        part.close()


def _backward(loss_sum, total):
    (loss_sum / total).backward()
    return loss_sum.detach()


def test_dropout_masks_are_replayed(sep):
    """With the RNG not restored on recompute, the gradients would differ: the test above can fail."""
    path, _ = sep("qwen2")
    batch = collate(examples((8, 8)), pad_id=0)
    a, b = lora_part(path, dropout=0.5), lora_part(path, dropout=0.5)
    torch.manual_seed(3)
    LayerwiseEngine(a).forward_backward(batch)
    torch.manual_seed(4)  # other masks: other gradients
    LayerwiseEngine(b).forward_backward(batch)
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not torch.allclose(grads(a)[name], grads(b)[name])


def test_only_upper_layers_trainable(sep):
    path, _ = sep("qwen2")
    batch = collate(examples((7, 10)), pad_id=0)
    targets = r"model\.layers\.2\..*(q_proj|down_proj)"
    ref, part = lora_part(path, targets=targets), lora_part(path, targets=targets)
    (full_graph_loss_sum(ref, batch) / batch.n_targets).backward()
    LayerwiseEngine(part).forward_backward(batch)
    assert len(grads(part)) == 4
    assert_grads_close(grads(part), grads(ref))


def test_bf16_compute_matches_full_graph(sep):
    """bf16 weights and activations (fp32 adapters): the same rounding as the full graph, up to bf16 noise."""
    path, _ = sep("qwen2_bf16")
    batch = collate(examples((9, 12), seed=6), pad_id=0)
    ref, part = lora_part(path), lora_part(path)
    assert part.dtype == torch.bfloat16
    want_loss = full_graph_loss_sum(ref, batch)
    (want_loss / batch.n_targets).backward()
    out = LayerwiseEngine(part).forward_backward(batch)
    assert out.loss_sum == pytest.approx(float(want_loss.detach()), rel=1e-2)
    got, want = grads(part), grads(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        cos = F.cosine_similarity(got[name].flatten(), want[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_accumulated_micro_batches_equal_peft_and_transformers_loss(sep):
    """Two micro-batches normalised by the targets of both == transformers' loss on all rows (labels shifted inside)."""
    from peft import LoraConfig, get_peft_model

    path, ckpt = sep("qwen2")
    part = lora_part(path, dropout=0.1, r=4, alpha=8)
    twin = get_peft_model(
        copy.deepcopy(ckpt.model),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL7),
    )
    ours = dict(part.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_" in name:
                p.copy_(ours[name.removeprefix("base_model.model.").replace(".default.", ".")])
    twin.train()
    exs = examples((9, 6, 12, 5), seed=4)
    micro = [collate(exs[:2], pad_id=0), collate(exs[2:], pad_id=0)]
    whole = collate(exs, pad_id=0)
    total = sum(mb.n_targets for mb in micro)
    assert total == whole.n_targets

    engine = LayerwiseEngine(part)
    torch.manual_seed(11)
    loss_sum = sum(engine.forward_backward(mb, normalizer=total).loss_sum for mb in micro)
    torch.manual_seed(11)  # PEFT's dropout draws the same masks in the same module order, one micro-batch at a time
    hf_loss = sum(
        twin(
            mb.input_ids,
            attention_mask=mb.attention_mask,
            labels=mb.labels,
            num_items_in_batch=total,
        ).loss
        for mb in micro
    )
    hf_loss.backward()
    assert loss_sum / total == pytest.approx(float(hf_loss.detach()), rel=1e-6)
    (
        twin.eval(),
        part.eval(),
    )  # without dropout: == the mean over the target tokens of all rows in one batch
    with torch.no_grad():
        whole_loss = twin(whole.input_ids, attention_mask=whole.attention_mask, labels=whole.labels).loss
    assert sum(engine.loss(mb).loss_sum for mb in micro) / total == pytest.approx(float(whole_loss), rel=1e-6)
    want = {
        n.removeprefix("base_model.model.").replace(".default.", "."): p.grad
        for n, p in twin.named_parameters()
        if p.grad is not None
    }
    assert_grads_close(grads(part), want, atol=1e-5, rtol=1e-4)


def test_chunked_cross_entropy_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    N, H, V = 37, 16, 203
    y = (torch.randn(N, H, generator=g) * 3).requires_grad_()  # large logits: the online softmax must rescale
    w = torch.randn(V, H, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    t[:3] = torch.tensor([0, V - 1, 64])  # first and last vocabulary rows, a chunk border
    want = F.cross_entropy(y @ w.T, t, reduction="sum")
    want.backward()
    edges = [0, 64, 65, 150, V]  # uneven chunks, one of a single row
    chunks = [(a, b, w[a:b]) for a, b in itertools.pairwise(edges)]
    loss, grad = chunked_cross_entropy(y.detach(), chunks, t, grad_scale=1.0)
    torch.testing.assert_close(loss, want.detach(), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(grad, y.grad, **FP32)
    loss_only, none = chunked_cross_entropy(y.detach(), chunks, t)
    assert none is None and torch.equal(loss_only, loss)


def test_eval_loss_equals_full_forward(sep):
    path, _ = sep("qwen2_tied")
    part = lora_part(path).eval()
    batch = collate(examples((9, 4, 11), seed=5), pad_id=0)
    with torch.no_grad():
        want = full_graph_loss_sum(part, batch)
    out = LayerwiseEngine(part).loss(batch)
    assert out.loss_sum == pytest.approx(float(want), rel=1e-6) and out.n_targets == batch.n_targets


def test_refuses_what_it_cannot_train(sep):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match="needs the whole model"):
        LayerwiseEngine(load_part(path, "b 0-2"))
    part = load_part(path, "f")
    with pytest.raises(ValueError, match="no trainable parameters"):
        LayerwiseEngine(part).forward_backward(collate(examples((5,)), 0))
    part.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(
        ValueError,
        match=r"model.embed_tokens.weight.*keeps the embedding and the head frozen",
    ):
        LayerwiseEngine(part)
    with pytest.raises(TypeError, match="QwenPart"):
        LayerwiseEngine(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_batch_without_targets_is_a_no_op(sep):
    path, _ = sep("qwen2")
    part = lora_part(path)
    batch = collate(examples((5,), prompt=5), pad_id=0)
    out = LayerwiseEngine(part).forward_backward(batch)
    assert (out.loss_sum, out.n_targets) == (0.0, 0) and not grads(part)
