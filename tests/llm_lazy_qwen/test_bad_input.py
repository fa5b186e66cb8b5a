import pytest
import torch

import llm_sepweight as sw
from llm_lazy_qwen import ConfigError, QwenConfig, from_pretrained, load_part


def test_spec_outside_the_model(sep):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match="asks for layer 3, but the model has 3 layers"):
        load_part(path, "2-5")


def test_non_contiguous_spec(sep):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match="must be one contiguous range"):
        load_part(path, "0 2")
    with pytest.raises(ValueError, match="a part holding 'b' must start at layer 0"):
        load_part(path, "b 1-2")
    with pytest.raises(ValueError, match=r"a part holding 'e' must end at the last layer \(2\)"):
        load_part(path, "0-2 e")


def test_hidden_states_of_the_wrong_width(sep):
    path, _ = sep("qwen2")
    mid = load_part(path, "1-3 e")
    with pytest.raises(
        ValueError,
        match=r"starts at layer 1, so it takes hidden states of shape \(batch, seq, hidden_size=64\); got \(1, 4, 32\)",
    ):
        mid(torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="takes hidden states"):
        mid(torch.zeros(1, 4, dtype=torch.long))


def test_token_ids_for_the_begin_part(sep):
    path, _ = sep("qwen2")
    model = load_part(path)
    with pytest.raises(ValueError, match=r"holds the embedding \('b'\), so it takes token ids"):
        model(torch.zeros(1, 4, 64))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=384\)"):
        model(torch.tensor([[1, 384]]))
    with pytest.raises(ValueError, match="seq length 0"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_positions_beyond_max_position_embeddings(sep):
    path, _ = sep("qwen2")
    model = load_part(path)
    with pytest.raises(ValueError, match="position 300 is beyond max_position_embeddings=256"):
        model(torch.tensor([[1, 2]]), position_ids=torch.tensor([[299, 300]]))
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 255, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="position 256 is beyond max_position_embeddings=256"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)


def test_bad_attention_mask_and_positions(sep):
    path, _ = sep("qwen2")
    model = load_part(path)
    with pytest.raises(
        ValueError, match=r"attention_mask must be \(batch=1, 3\) or \(batch=1, past\+new=3\); got \(1, 5\)"
    ):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"position_ids must be \(batch=1, seq=3\)"):
        model(torch.tensor([[1, 2, 3]]), position_ids=torch.tensor([[0, 1]]))


def test_bad_logits_to_keep(sep):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match=r"logits_to_keep must be >= 0 \(0: all positions, n: the last n\), got -1"):
        load_part(path)(torch.tensor([[1, 2]]), logits_to_keep=-1)


def test_config_errors():
    base = dict(
        architectures=["Qwen2ForCausalLM"],
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=10,
    )
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['intermediate_size'\]"):
        QwenConfig.from_dict({k: v for k, v in base.items() if k != "intermediate_size"})
    with pytest.raises(ConfigError, match="is not a supported family"):
        QwenConfig.from_dict({**base, "architectures": ["GemmaForCausalLM"], "model_type": "gemma"})
    with pytest.raises(ConfigError, match="rope type 'longrope' is not supported"):
        QwenConfig.from_dict({**base, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6}})
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads=3"):
        QwenConfig.from_dict({**base, "num_key_value_heads": 3})


def test_bad_dtype(sep):
    path, _ = sep("qwen2")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        load_part(path, dtype="int8")


def test_from_pretrained_converts_once(qwen_checkpoints, tmp_path, monkeypatch):
    ckpt = qwen_checkpoints("qwen2_sharded")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    model = from_pretrained(ckpt.path, cache_dir=tmp_path / "c", lazy=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ckpt.model(ids).logits, atol=1e-4, rtol=1e-4)
    import llm_sepweight.writer as w

    calls = []
    monkeypatch.setattr(w, "write_part_file", lambda *a, **k: calls.append(a))
    from_pretrained(ckpt.path, cache_dir=tmp_path / "c")
    assert calls == []
    assert sw.verify(tmp_path / "c").ok
