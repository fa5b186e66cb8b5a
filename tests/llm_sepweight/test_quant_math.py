"""Quantize -> dequantize error bounds, the clipping search against plain RTN, and rejected input."""

import pytest
import torch

import llm_sepweight as sw


def _int4_error(w: torch.Tensor, g: int, method: str, layout: str | None = None) -> torch.Tensor:
    qweight, sz = sw.quantize_int4(w, g, layout=layout, method=method)
    spec = sw.QuantSpec("int4", tuple(w.shape), g, layout or sw.int4_layout())
    return sw.dequantize({"qweight": qweight, "scales_and_zeros": sz}, spec) - w.float()


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("method", ["rtn", "clip"])
def test_int4_error_is_within_half_a_step_of_the_group_range(g, method):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    err = _int4_error(w, g, method).abs().view(64, -1, g)
    step = (w.view(64, -1, g).amax(-1) - w.view(64, -1, g).amin(-1)) / 15  # RTN's step
    if method == "rtn":
        assert (err <= step.unsqueeze(-1) / 2 * 1.0001 + 1e-6).all()
    else:  # clipping may cut an outlier by up to 12% of the range
        assert (err <= step.unsqueeze(-1) * (0.5 + 0.13 * 15) + 1e-6).all()


@pytest.mark.parametrize(
    "make", [lambda: torch.randn(128, 512), lambda: torch.distributions.StudentT(3.0).sample((128, 512))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_has_less_weight_error_than_rtn_in_every_group(make, dtype):
    torch.manual_seed(0)
    w = make().to(dtype)
    rtn = _int4_error(w, 64, "rtn").pow(2).view(128, -1, 64).sum(-1)
    clip = _int4_error(w, 64, "clip").pow(2).view(128, -1, 64).sum(-1)
    assert (clip <= rtn * (1 + 1e-6)).all()  # RTN is one of the candidates, scored with the stored scales
    assert clip.sum() < 0.9 * rtn.sum()


def test_int8_round_trip_error_is_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q, s = sw.quantize_int8(w)
    err = (sw.dequantize({"qweight": q, "scales": s}, sw.QuantSpec("int8", (64, 128))) - w).abs()
    assert (err <= s[:, None] / 2 * 1.0001).all()


def test_zero_and_constant_groups_are_exact():
    w = torch.zeros(64, 64)
    w[1] = 0.5
    assert _int4_error(w, 32, "clip").abs().max() == 0
    q, s = sw.quantize_int8(w)
    assert torch.equal(sw.dequantize({"qweight": q, "scales": s}, sw.QuantSpec("int8", (64, 64))), w)


def test_dequantize_takes_prefixed_keys_and_row_chunks():
    torch.manual_seed(0)
    w = torch.randn(192, 64)
    qweight, sz = sw.quantize_int4(w, 32)
    spec = sw.QuantSpec("int4", (192, 64), 32, sw.int4_layout())
    full = sw.dequantize({"lm_head.qweight": qweight, "lm_head.scales_and_zeros": sz}, spec)
    chunk = sw.dequantize({"qweight": qweight[64:128], "scales_and_zeros": sz[64:128]}, spec)
    assert torch.equal(chunk, full[64:128])
    assert sw.dequantize({"qweight": qweight, "scales_and_zeros": sz}, spec, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: sw.quantize_int4(torch.randn(64, 96), 64, name="mlp.down_proj.weight"),
            r"mlp.down_proj.weight: .*K=96 .*group size 64.*\[32\]",
        ),
        (lambda: sw.quantize_int4(torch.randn(64, 64), 48), r"group size 48 is not one of"),
        (lambda: sw.quantize_int4(torch.randn(64, 64), method="gptq"), r"method 'gptq' is not one of"),
        (lambda: sw.quantize_int4(torch.randn(96, 64), 32, layout="aten_cpu_avx512"), r"96 rows .* multiple of 64"),
        (lambda: sw.quantize_int4(torch.randn(64, 64), 32, layout="nibbles"), r"unknown int4 layout 'nibbles'"),
        (lambda: sw.quantize_int8(torch.randn(4, 4, 4)), r"2-D floating weight"),
        (lambda: sw.quantize_int8(torch.ones(4, 4, dtype=torch.int32)), r"2-D floating weight"),
        (
            lambda: sw.quantize_int8(torch.tensor([[1.0, float("nan")]]), name="q_proj.weight"),
            r"q_proj.weight: .*NaN or inf",
        ),
        (lambda: sw.pack_int4(torch.full((64, 4), 16, dtype=torch.uint8), "rows"), r"values must be in 0..15"),
        (lambda: sw.pack_int4(torch.zeros(64, 3, dtype=torch.uint8), "rows"), r"K=3 is odd"),
        (lambda: sw.unpack_int4(torch.zeros(64, 4, dtype=torch.int8), "rows"), r"2-D uint8"),
        (lambda: sw.QuantSpec("int3", (4, 4)), r"scheme 'int3' is not one of"),
        (lambda: sw.QuantSpec("int4", (64, 96), 64, "rows"), r"K=96 is not even and a multiple of group_size 64"),
        (lambda: sw.QuantSpec("int4", (32, 64), 32, "aten_cpu_avx512"), r"N=32 is not a multiple"),
        (lambda: sw.QuantSpec("int8", (4, 4), 32), r"int8 has no group_size"),
    ],
)
def test_bad_input_is_rejected_clearly(call, match):
    with pytest.raises(sw.SepweightError, match=match):
        call()


def test_dequantize_rejects_mismatched_tensors():
    qweight, sz = sw.quantize_int4(torch.randn(64, 64), 32)
    spec = sw.QuantSpec("int4", (64, 64), 64, sw.int4_layout())
    with pytest.raises(sw.SepweightError, match=r"scales_and_zeros has shape \[64, 2, 2\]"):
        sw.dequantize({"qweight": qweight, "scales_and_zeros": sz}, spec)
    with pytest.raises(sw.SepweightError, match=r"need exactly one 'scales_and_zeros'"):
        sw.dequantize({"qweight": qweight}, spec)


def test_weighted_clip_search_beats_rtn_in_the_weighted_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    c = torch.rand(256) ** 4 * 10  # a few columns matter much more
    qweight, sz = sw.quantize_int4(w, 64, importance=c)
    spec = sw.QuantSpec("int4", (64, 256), 64, sw.int4_layout())
    clip = (sw.dequantize({"qweight": qweight, "scales_and_zeros": sz}, spec) - w).square() * c
    rtn = _int4_error(w, 64, "rtn").square() * c
    assert (clip.view(64, 4, 64).sum(-1) <= rtn.view(64, 4, 64).sum(-1) * (1 + 1e-6)).all()
    unweighted = _int4_error(w, 64, "clip").square() * c
    assert clip.sum() < unweighted.sum()  # weighing the search lowers the error it is told to lower
    with pytest.raises(sw.SepweightError, match=r"q_proj.weight: importance must be \[256\] non-negative"):
        sw.quantize_int4(w, 64, importance=-c, name="q_proj.weight")


def test_input_moment_estimates_the_activation_sizes():
    from llm_sepweight.quant_importance import input_moment as input_importance

    g = torch.Generator().manual_seed(0)
    hidden, inter, heads, kv_heads = 32, 48, 4, 2
    t = {
        "input_layernorm.weight": torch.rand(hidden, generator=g) + 0.5,
        "post_attention_layernorm.weight": torch.rand(hidden, generator=g) + 0.5,
        "self_attn.v_proj.weight": torch.randn(16, hidden, generator=g) * 0.2,
        "self_attn.v_proj.bias": torch.randn(16, generator=g) * 0.1,
        "self_attn.o_proj.weight": torch.randn(hidden, hidden, generator=g),
        "mlp.gate_proj.weight": torch.randn(inter, hidden, generator=g) * 0.3,
        "mlp.up_proj.weight": torch.randn(inter, hidden, generator=g) * 0.3,
    }
    config = {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
    n = torch.randn(200_000, hidden, generator=g)  # the assumption: unit-variance normalised hidden states
    x1, x2 = n * t["input_layernorm.weight"], n * t["post_attention_layernorm.weight"]
    torch.testing.assert_close(
        input_importance(0, "self_attn.k_proj.weight", t, config), x1.square().mean(0), rtol=0.02, atol=0
    )
    torch.testing.assert_close(
        input_importance(0, "mlp.up_proj.weight", t, config), x2.square().mean(0), rtol=0.02, atol=0
    )
    v = x1 @ t["self_attn.v_proj.weight"].T + t["self_attn.v_proj.bias"]  # (T, kv_heads * head_dim)
    want_o = v.view(-1, kv_heads, 1, 8).expand(-1, kv_heads, 2, 8).reshape(-1, hidden).square().mean(0)
    torch.testing.assert_close(input_importance(0, "self_attn.o_proj.weight", t, config), want_o, rtol=0.03, atol=0)
    h = torch.nn.functional.silu(x2 @ t["mlp.gate_proj.weight"].T) * (x2 @ t["mlp.up_proj.weight"].T)
    torch.testing.assert_close(
        input_importance(0, "mlp.down_proj.weight", t, config), h.square().mean(0), rtol=0.05, atol=0
    )
    end = {"norm.weight": t["input_layernorm.weight"]}
    assert torch.equal(input_importance("end", "lm_head.weight", end, config), t["input_layernorm.weight"].square())
    assert input_importance("begin", "embed_tokens.weight", {}, config) is None


def test_input_importance_is_the_moment_over_the_column_norms():
    from llm_sepweight.quant_importance import input_importance, input_moment

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g) * (torch.rand(32, generator=g) + 0.1)  # columns of different sizes
    t = {"post_attention_layernorm.weight": torch.rand(32, generator=g) + 0.5, "mlp.up_proj.weight": w}
    want = input_moment(0, "mlp.up_proj.weight", t, {}) / w.square().sum(0)
    torch.testing.assert_close(input_importance(0, "mlp.up_proj.weight", t, {}), want / want.mean())
    w[:, 3] = 0  # a zero column weighs 1e4 x the mean column's, not inf
    imp = input_importance(0, "mlp.up_proj.weight", t, {})
    assert torch.isfinite(imp).all() and imp[3] > 100 * imp.median()
    t["mlp.up_proj.weight"] = torch.zeros(48, 32)  # nothing to balance: the moment alone
    assert torch.equal(input_importance(0, "mlp.up_proj.weight", t, {}), input_moment(0, "mlp.up_proj.weight", t, {}))


def _group_error(w: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, c: torch.Tensor, g: int) -> torch.Tensor:
    """Weighted squared error per group of w against (q - 8) * s + z."""  # (N, K // g)
    n, k = w.shape
    deq = (q.float().view(n, -1, g) - 8) * sz[..., :1].float() + sz[..., 1:].float()
    return ((deq - w.float().view(n, -1, g)).square() * c.view(1, -1, g)).sum(-1)


def _hard_weights() -> torch.Tensor:
    """Gaussian and heavy-tailed rows, constant groups, zero rows, huge outliers."""
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[8:16] = torch.distributions.StudentT(2.0).sample((8, 256)) * 0.02
    w[16, :64] = 0.375  # a constant group (exact in every scale dtype)
    w[17] = 0  # a zero row
    w[18, 5] = 50.0  # huge outliers, one per group
    w[19, 70], w[19, 200] = -80.0, 1e3
    return w


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_default_method_never_has_more_weighted_error_than_rtn_in_any_group(scale_dtype):
    from llm_sepweight.quant_search import scales_and_zeros

    w = _hard_weights()
    c = torch.rand(256) ** 4 * 10
    c[:40] = 0  # columns that do not count, and one that counts 1e6 times more
    c[100] = 1e6
    for imp in (c, None, torch.ones(256)):
        q, sz = scales_and_zeros(w, 64, scale_dtype, "clip", imp)
        qr, szr = scales_and_zeros(w, 64, scale_dtype, "rtn")
        assert torch.isfinite(sz).all() and int(q.max()) <= 15
        weights = torch.ones(256) if imp is None else imp
        err, rtn = _group_error(w, q, sz, weights, 64), _group_error(w, qr, szr, weights, 64)
        assert (err <= rtn * (1 + 1e-5) + 1e-12).all()
        assert err.sum() < rtn.sum()
    exact = _group_error(w, q, sz, torch.ones(256), 64)
    assert exact[16, 0] == 0 and exact[17].max() == 0  # a constant group, a zero row


@pytest.mark.parametrize("layout", ["aten_cpu_avx512", "aten_cpu_avx2", "aten_cpu_default", "rows"])
def test_quantized_codes_round_trip_through_every_layout(layout):
    from llm_sepweight.quant_search import scales_and_zeros

    w = _hard_weights().to(torch.bfloat16)
    q, sz = scales_and_zeros(w, 64, torch.bfloat16, "clip", torch.rand(256))
    packed, sz2 = sw.quantize_int4(w, 64, layout=layout, importance=torch.rand(256))
    assert packed.dtype == torch.uint8 and packed.shape == (64, 128) and sz2.dtype == torch.bfloat16
    assert torch.equal(sw.unpack_int4(sw.pack_int4(q, layout), layout), q)
    spec = sw.QuantSpec("int4", (64, 256), 64, layout)
    deq = sw.dequantize({"qweight": sw.pack_int4(q, layout), "scales_and_zeros": sz}, spec)
    want = (q.float().view(64, 4, 64) - 8) * sz[..., :1].float() + sz[..., 1:].float()
    assert torch.equal(deq, want.view(64, 256))


def test_scales_a_scale_dtype_cannot_hold_are_rejected():
    w = torch.randn(64, 64)
    w[3, 7] = 3e6  # range / 15 overflows fp16
    with pytest.raises(sw.SepweightError, match=r"down_proj.weight: int4 scales overflow torch.float16 .*fp32 scales"):
        sw.quantize_int4(w, 64, scale_dtype=torch.float16, name="down_proj.weight")
    with pytest.raises(sw.SepweightError, match=r"importance must be \[64\] non-negative finite"):
        sw.quantize_int4(w, 64, importance=torch.full((64,), float("inf")))
