"""Stage specs: automatic splits and clear errors for specs that overlap, leave gaps or misplace b / e.
Also the CPU share of a rank when several share a host."""

import pytest

from llm_pipeline import (
    parse_stages,
    split_bytes,
    split_layers,
    stage_specs,
)
from llm_pipeline.spec import part_sizes
from llm_sepweight import SepWeights


def names(specs):
    return [str(s) for s in specs]


@pytest.mark.parametrize(
    ("layers", "stages", "want"),
    [
        (24, 3, ["b 0-8", "8-16", "16-24 e"]),
        (7, 3, ["b 0-3", "3-5", "5-7 e"]),
        (3, 3, ["b 0", "1", "2 e"]),
        (5, 1, ["b 0-5 e"]),
    ],
)
def test_split_layers(layers, stages, want):
    assert names(split_layers(layers, stages)) == want


@pytest.mark.parametrize(
    ("sizes", "stages", "want"),
    [
        ([40, 10, 10, 10, 10, 40], 2, ["b 0-2", "2-4 e"]),
        ([10, 10, 10, 10, 10, 10], 3, ["b 0", "1-3", "3 e"]),
        (
            [100, 10, 10, 10, 100],
            3,
            ["b", "0-3", "e"],
        ),  # a huge embedding / head gets a stage to itself
        ([1, 50, 1, 1, 1, 1], 2, ["b 0", "1-4 e"]),
    ],
)
def test_split_bytes(sizes, stages, want):
    assert names(split_bytes(sizes, stages)) == want


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ("b 0-2,1-3 e", r"stage 1 '1-3 e' overlaps stage 0 'b 0-2' at layer 1"),
        ("b 0-1,2-3 e", r"layer\(s\) 1 are in no stage \(stage 1 starts at layer 2\)"),
        ("b 0-1,1-2 e", r"layer\(s\) 2-3 of the model's 3 are in no stage"),
        ("0-1,1-3 e", r"the first stage must hold 'b'"),
        ("b 0-1,1-3", r"the last stage must hold 'e'"),
        ("b 0-1,b 1-3 e", r"only the first stage may hold 'b'"),
        ("b 0-1 e,1-3 e", r"only the last stage may hold 'e'"),
        ("b 0 2,1 e", r"one contiguous range"),
        ("b 0-3,f", r"'f' \(the whole model\) only works as the single stage"),
        ("b 0-4 e", r"asks for layer 3, but the model has 3 layers"),
        ("b 0-1,,1-3 e", r"one spec per stage separated by commas"),
        ("b 0-1,x,1-3 e", r"token 'x' is not understood"),
    ],
)
def test_bad_stage_specs(parts, match):
    with pytest.raises(ValueError, match=match):
        parse_stages(parts, num_layers=3)


def test_stage_specs_of_a_folder(sep):
    path, _ = sep("qwen2")
    source = SepWeights(path)
    sizes = part_sizes(source)
    assert len(sizes) == 5 and sum(sizes) > 0
    assert names(stage_specs("auto", 2, source, balance="layers")) == ["b 0-2", "2 e"]
    assert names(stage_specs("b 0-1, 1-3 e", 2, source)) == ["b 0", "1-3 e"]
    with pytest.raises(ValueError, match=r"2 stage specs .* for 3 ranks; give one spec per rank"):
        stage_specs("b 0-1,1-3 e", 3, source)
    with pytest.raises(ValueError, match=r"cannot split 3 layers into 4 stages"):
        stage_specs("auto", 4, source, balance="layers")
    with pytest.raises(ValueError, match=r"balance must be 'bytes' or 'layers'"):
        stage_specs("auto", 2, source, balance="flops")


def test_auto_by_bytes_needs_every_part(sep, tmp_path):
    import llm_sepweight as sw

    _, ckpt = sep("qwen2")
    sw.convert(ckpt.path, tmp_path / "half", parts="b 0-2", progress=False)
    source = SepWeights(tmp_path / "half")
    with pytest.raises(ValueError, match=r"holds only 'b 0-2'.*balance='layers'"):
        stage_specs("auto", 2, source)
    assert names(stage_specs("auto", 2, source, balance="layers")) == ["b 0-2", "2 e"]


@pytest.mark.parametrize(
    ("cpus", "world", "want"),
    [
        ([0, 1], 2, [[0], [1]]),
        ([0, 1, 2, 3], 2, [[0, 1], [2, 3]]),
        ([0, 1, 2, 3, 4], 3, [[0], [1, 2], [3, 4]]),
        ([4, 5], 3, [[4], [4], [5]]),  # more ranks than CPUs: some share one
    ],
)
def test_cpu_share(cpus, world, want):
    from llm_pipeline.stage import _cpu_share

    assert [_cpu_share(cpus, r, world) for r in range(world)] == want
