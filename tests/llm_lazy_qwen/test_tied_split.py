"""A tied-embedding model converted without ``b`` runs its end part (issue 15 item 8).

The multi-host recipe converts ``"12-24 e"`` on one host; for a tied model (Qwen2.5-0.5B) the head
is the embedding, which the conversion must still store. Logits equal transformers'.
"""

import pytest
import torch
from lazy_helpers import FP32, token_ids

import llm_sepweight as sw
from llm_lazy_qwen import load_part


def _last_layer_output(model, ids: torch.Tensor) -> torch.Tensor:
    """The last decoder layer's output before the final norm (transformers' hidden_states[-1] is after it)."""
    got: list[torch.Tensor] = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, args, out: got.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        model(ids)
    finally:
        hook.remove()
    return got[0]


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3_tied_sharded"])
def test_end_part_of_tied_model_without_begin(qwen_checkpoints, tmp_path, name, lazy):
    ckpt = qwen_checkpoints(name)
    ids = token_ids(seed=7)
    sw.convert(ckpt.path, tmp_path / "mid-end", parts="1-3 e", progress=False)
    sw.convert(ckpt.path, tmp_path / "end", parts="e", progress=False)
    sw.convert(ckpt.path, tmp_path / "begin", parts="b", progress=False)
    with torch.no_grad():
        out = ckpt.model(ids, output_hidden_states=True)
        part = load_part(tmp_path / "mid-end", "1-3 e", lazy=lazy, head_chunk_size=100)
        torch.testing.assert_close(part(out.hidden_states[1]), out.logits, **FP32)
        part.close()
        end = load_part(tmp_path / "end", "e", lazy=lazy, head_chunk_size=100)
        torch.testing.assert_close(end(_last_layer_output(ckpt.model, ids)), out.logits, **FP32)
        end.close()
        begin = load_part(tmp_path / "begin", "b", lazy=lazy)
        torch.testing.assert_close(begin(ids), out.hidden_states[0], **FP32)
        begin.close()
