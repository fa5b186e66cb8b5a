"""QLoRA on CPU: the layer-wise engine trains LoRA over an int8/int4 folder; its loss and gradients equal one
full autograd graph over the dequantized model (fp32 1e-4), in RAM and lazy; ``llm-sft train`` on a quantized
folder writes a PEFT adapter that PEFT loads onto the transformers model holding the dequantized weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from sft_helpers import examples, full_graph_loss_sum, grads, randomize_adapters
from torch import nn

import llm_sepweight as sw
from llm_lazy_qwen import load_part
from llm_lora_mmap import apply_lora, is_linear_like, load_adapter, mark_only_lora_trainable
from llm_sft import LayerwiseEngine, collate
from llm_sft.cli import main

TOL = {"atol": 1e-4, "rtol": 1e-4}
SCHEMES = ["int8", "int4"]
LAZY = [None, {"prefetch": 0}, {"prefetch": 2, "stream_mode": "mmap"}]


@pytest.fixture(scope="module")
def quantized(qwen_checkpoints, tmp_path_factory):
    """``quantized(scheme) -> (folder, TinyCheckpoint)``: the tiny untied Qwen2 converted with quant=scheme."""
    root = tmp_path_factory.mktemp("qsep")
    cache = {}

    def get(scheme):
        ckpt = qwen_checkpoints("qwen2")
        if scheme not in cache:
            sw.convert(ckpt.path, root / scheme, quant=scheme, group_size=32, progress=False)
            cache[scheme] = root / scheme
        return cache[scheme], ckpt

    return get


def _quant_linears(part: nn.Module) -> dict[str, nn.Module]:
    """The part's quantized linears by name (a LoRA wrapper's ``.base_layer`` suffix removed)."""
    return {
        n.removesuffix(".base_layer"): m
        for n, m in part.named_modules()
        if is_linear_like(m) and not isinstance(m, nn.Linear)
    }


def _dequantized_weights(folder) -> dict[str, torch.Tensor]:
    """Module name -> the fp32 weight its quantized linear stands for (read through an in-RAM part)."""
    part = load_part(folder, "f")
    found = {n: m.dequantize(torch.float32) for n, m in _quant_linears(part).items()}
    assert len(found) == 3 * 7 + 1, sorted(found)  # every projection of the 3 layers, and the untied head
    return found


def _dequantized_part(dense_folder, weights: dict[str, torch.Tensor]):
    """The unquantized part with every quantized linear's weight replaced by its dequantized value."""
    part = load_part(dense_folder, "f", head_chunk_size=100)
    for name, w in weights.items():
        part.get_submodule(name).weight = nn.Parameter(w, requires_grad=False)
    return part


def _lora(part, dropout):
    apply_lora(part, "all-linear", r=4, lora_alpha=8, lora_dropout=dropout)
    randomize_adapters(part)
    mark_only_lora_trainable(part)
    return part.train()


@pytest.mark.parametrize("load", LAZY, ids=["ram", "lazy", "lazy-prefetch-mmap"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_engine_over_quantized_part_equals_autograd_on_dequantized_model(quantized, sep, scheme, load):
    """Two accumulated micro-batches with padding and dropout: loss and every LoRA gradient."""
    folder, _ = quantized(scheme)
    dense_folder, _ = sep("qwen2")
    ref = _lora(_dequantized_part(dense_folder, _dequantized_weights(folder)), dropout=0.3)
    part = _lora(load_part(folder, "f", head_chunk_size=100, lazy=load is not None, **(load or {})), dropout=0.3)
    assert len(_quant_linears(part)) == 3 * 7 + 1
    batches = [collate(examples((9, 6, 12)), pad_id=0), collate(examples((7, 10), seed=2), pad_id=0)]
    total = sum(b.n_targets for b in batches)

    torch.manual_seed(7)  # the dropout masks
    want_loss = 0.0
    for b in batches:
        loss_sum = full_graph_loss_sum(ref, b)
        (loss_sum / total).backward()
        want_loss += float(loss_sum.detach())
    torch.manual_seed(7)
    engine = LayerwiseEngine(part)
    got_loss = sum(engine.forward_backward(b, normalizer=total).loss_sum for b in batches)

    assert got_loss == pytest.approx(want_loss, rel=1e-5)
    got, want = grads(part), grads(ref)
    assert sorted(got) == sorted(want) and len(want) == 2 * 7 * 3
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, **TOL, msg=name)
    if load is not None:  # the quantized weights were streamed and released again
        assert part.get_submodule("model.layers.1.self_attn.q_proj.base_layer").qweight.is_meta
    part.close()


def _write_data(path, n):
    words = "the quick brown fox jumps over the lazy dog and then the cat sat on the mat".split()
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(n):
            pick = [words[int(i)] for i in torch.randint(0, len(words), (8,), generator=g)]
            f.write(json.dumps({"instruction": " ".join(pick[:4]), "input": "", "output": " ".join(pick[4:])}) + "\n")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cli_trains_on_a_quantized_folder_and_peft_reproduces_our_logits(quantized, tmp_path, scheme):
    """The adapter has the keys and format of one trained on the unquantized model: PEFT loads it onto the
    transformers model holding the dequantized weights, and its logits equal ours over the quantized folder."""
    from peft import PeftModel

    folder, ckpt = quantized(scheme)
    _write_data(tmp_path / "train.jsonl", 6)
    out = tmp_path / "adapter"
    args = ["train", "--model", str(folder), "--data", str(tmp_path / "train.jsonl"), "--out", str(out)]
    args += ["--max-seq-len", "64", "--batch-size", "2", "--r", "4", "--alpha", "8", "--lr", "1e-2"]
    assert main([*args, "--lazy", "--no-progress"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")

    hf = copy.deepcopy(ckpt.model)
    with torch.no_grad():
        for name, w in _dequantized_weights(folder).items():
            hf.get_submodule(name).weight.copy_(w)
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    ours = load_part(folder, "f")
    load_adapter(ours, out)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model(ids).logits, **TOL)
        base = peft_model.get_base_model()
        with peft_model.disable_adapter():
            assert not torch.allclose(ours(ids), base(ids).logits, atol=1e-3)  # training changed something
