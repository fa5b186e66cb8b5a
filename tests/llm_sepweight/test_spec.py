import pytest

from llm_sepweight import PartSpec, SepweightError


@pytest.mark.parametrize(
    ("text", "begin", "layers", "end", "canonical"),
    [
        ("b 0-12", True, tuple(range(12)), False, "b 0-12"),
        ("12-24 e", False, tuple(range(12, 24)), True, "12-24 e"),
        ("5", False, (5,), False, "5"),
        ("e 3 b 0-3", True, (0, 1, 2, 3), True, "b 0-4 e"),
        ("0-2 5-7", False, (0, 1, 5, 6), False, "0-2 5-7"),
        ("b", True, (), False, "b"),
        ("  b   0-1  ", True, (0,), False, "b 0"),
    ],
)
def test_parse(text, begin, layers, end, canonical):
    spec = PartSpec.parse(text)
    assert (spec.begin, spec.layers, spec.end) == (begin, layers, end)
    assert str(spec) == canonical
    assert PartSpec.parse(str(spec)) == spec


def test_full_expands_to_every_layer():
    spec = PartSpec.parse("f")
    assert spec.is_full and str(spec) == "f"
    resolved = spec.resolve(4)
    assert resolved.layers == (0, 1, 2, 3) and resolved.begin and resolved.end


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("b 0-2 x", r"token 'x' is not understood; valid tokens are b, e, f, N or A-B"),
        ("0-5 3-8", r"'3-8' overlaps '0-5' at layer 3"),
        ("5-5", "is empty"),
        ("7-3", "is empty"),
        ("f 0-2", "cannot be combined"),
        ("b b", "appears twice"),
        ("-1", "not understood"),
        ("1.5", "not understood"),
    ],
)
def test_bad_specs(text, match):
    with pytest.raises(SepweightError, match=match):
        PartSpec.parse(text)


def test_range_beyond_model():
    with pytest.raises(SepweightError, match=r"asks for layer 4, but the model has 4 layers"):
        PartSpec.parse("2-5").resolve(4)


def test_not_a_string():
    with pytest.raises(SepweightError, match="must be a string"):
        PartSpec.parse(3)  # type: ignore[arg-type]


def test_contiguity():
    assert PartSpec.parse("b 0-4").is_contiguous()
    assert not PartSpec.parse("0-2 3-4").is_contiguous()
