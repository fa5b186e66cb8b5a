"""CUDA paths (run on a GPU machine; skipped elsewhere): in-RAM and lazy parts on the device."""

import pytest
import torch

from llm_lazy_qwen import load_part

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("mode", ["copy", "mmap"])
@pytest.mark.parametrize("lazy", [False, True], ids=["ram", "lazy"])
@pytest.mark.parametrize("name", ["qwen2", "qwen3_tied_sharded", "qwen2_swa"])
def test_cuda_logits_and_decode(sep, name, lazy, mode):
    path, ckpt = sep(name)
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(0))
    model = load_part(path, device="cuda", lazy=lazy, stream_mode=mode, head_chunk_size=100)
    with torch.no_grad():
        want = ckpt.model(ids).logits
        got = model(ids.cuda())
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
        # cached decode on the device equals the uncached CPU reference
        cache = model.new_cache()
        seq = ids[:1]
        logits = model(seq.cuda(), cache=cache, logits_to_keep=1)
        for _ in range(5):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt.cpu()], dim=1)
            logits = model(nxt, cache=cache)
        ref = ckpt.model(seq).logits[:, -1]
        torch.testing.assert_close(logits[:, -1].cpu(), ref, atol=1e-4, rtol=1e-4)
    model.close()
