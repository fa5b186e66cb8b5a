"""IncrementalPart behind llm_sampler's CachedForward: outputs equal the uncached transformers model."""

import pytest
import torch
from lazy_helpers import FP32

from llm_lazy_qwen import IncrementalPart, load_part

llm_sampler = pytest.importorskip("llm_sampler")


@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("name", ["qwen2", "qwen2_swa"])
def test_cached_forward_equals_uncached(sep, name, lazy):
    path, ckpt = sep(name)
    inc = IncrementalPart(load_part(path, lazy=lazy), extra_window_slots=1)
    fwd = llm_sampler.CachedForward(inc)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 384, (1, 10), generator=g)
    with torch.no_grad():
        for cont_len in (3, 6, 2, 9):  # each continuation crops back to the prompt: deeper than the ring allows
            ids = torch.cat([prompt, torch.randint(0, 384, (1, cont_len), generator=g)], dim=1)
            got = fwd(ids, logits_to_keep=cont_len)
            want = ckpt.model(ids).logits[:, -cont_len:]
            torch.testing.assert_close(got, want, **FP32)
    assert fwd.tokens_run < 4 * 10 + 3 + 6 + 2 + 9  # the prompt was not recomputed every time


def test_greedy_sampling_through_the_cache(sep):
    path, ckpt = sep("qwen2_swa")
    fwd = llm_sampler.CachedForward(IncrementalPart(load_part(path, lazy=True)))
    prompt = torch.randint(0, 384, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = llm_sampler.sample(fwd, prompt, 10, temperature=0)
        want = ckpt.model.generate(
            prompt,
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            top_k=None,
            top_p=None,
            temperature=None,
        )
    assert torch.equal(got, want[:, -10:])


def test_needs_a_whole_model(sep):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match="needs a part holding 'b' and 'e'"):
        IncrementalPart(load_part(path, "b 0-1"))
