"""prepare_dataset / read_records: templates against hand-built ids and transformers' chat template, truncation, bad input."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from llm_sft import DataWarning, prepare_dataset, read_records

# Qwen2.5's chat template without the tool-calling branches (what our ChatML must equal)
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok_dir(qwen_checkpoints):
    return qwen_checkpoints("qwen2").path  # tokenizer.json + tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def test_chatml_against_hand_built_ids_and_qwen_chat_template(tok_dir, tok):
    ds = prepare_dataset(
        tok_dir,
        ["Name a colour.", "Add them"],
        ["Blue.", "5"],
        inputs=[None, "2 and 3"],
        max_seq_len=128,
        system_prompt="Be brief.",
    )
    S, E = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    system = [S, *enc(tok, "system\nBe brief."), E, *enc(tok, "\n")]
    prompt = system + [
        S,
        *enc(tok, "user\nName a colour."),
        E,
        *enc(tok, "\n"),
        S,
        *enc(tok, "assistant\n"),
    ]
    answer = [*enc(tok, "Blue."), E]
    assert ds[0].input_ids == prompt + answer
    assert ds[0].labels == [-100] * len(prompt) + answer  # the end token <|im_end|> is trained
    prompt = system + [
        S,
        *enc(tok, "user\nAdd them\n\n2 and 3"),
        E,
        *enc(tok, "\n"),
        S,
        *enc(tok, "assistant\n"),
    ]
    assert ds[1].input_ids == prompt + [*enc(tok, "5"), E]
    assert ds.pad_id == tok.token_to_id("<|endoftext|>")

    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
    ]
    want_prompt = hf.apply_chat_template(messages, add_generation_prompt=True, chat_template=QWEN_CHAT_TEMPLATE)[
        "input_ids"
    ]
    full = hf.apply_chat_template(
        [*messages, {"role": "assistant", "content": "Blue."}],
        chat_template=QWEN_CHAT_TEMPLATE,
    )["input_ids"]
    assert ds[0].input_ids == want_prompt + answer == full[:-1]  # Qwen's template adds "\n" after <|im_end|>


def test_alpaca_with_and_without_input(tok_dir, tok):
    ds = prepare_dataset(
        tok_dir,
        ["Say hi", "Translate"],
        ["Hi!", "Bonjour"],
        inputs=["", "Hello"],
        template="alpaca",
        max_seq_len=256,
    )
    eos = tok.token_to_id("<|im_end|>")  # the eos_token of tokenizer_config.json
    no_input = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi\n\n### Response:\n"
    )
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate\n\n### Input:\nHello\n\n### Response:\n"
    )
    for ex, prompt_text, answer_text in (
        (ds[0], no_input, "Hi!"),
        (ds[1], with_input, "Bonjour"),
    ):
        prompt, answer = enc(tok, prompt_text), [*enc(tok, answer_text), eos]
        assert ex.input_ids == prompt + answer
        assert ex.labels == [-100] * len(prompt) + answer
    other_end = prepare_dataset(tok_dir, ["Say hi"], ["Hi!"], template="alpaca", end_token="<|endoftext|>")
    assert other_end[0].input_ids[-1] == tok.token_to_id("<|endoftext|>")


def test_truncation_keeps_the_prompt_and_counts(tok_dir, tok):
    short = prepare_dataset(tok, ["Q"], ["A"], max_seq_len=512)
    n_prompt = short[0].labels.count(-100)
    long_answer = "the quick brown fox jumps over the lazy dog " * 3
    long_prompt = "word " * 200
    with pytest.warns(DataWarning) as record:
        ds = prepare_dataset(
            tok,
            ["Q", "Q", long_prompt],
            ["A", long_answer, "A"],
            max_seq_len=n_prompt + 4,
        )
    messages = [str(w.message) for w in record]
    assert any(
        "1 of 3 examples were dropped: their prompt alone fills max_seq_len" in m and "rows [2]" in m for m in messages
    )
    cut = len(enc(tok, long_answer)) + 1 - 4
    assert any(
        f"1 of 3 examples were truncated to max_seq_len={n_prompt + 4} ({cut} response tokens cut" in m
        for m in messages
    )
    assert len(ds) == 2 and (
        ds.stats.truncated,
        ds.stats.dropped_too_long,
        ds.stats.response_tokens_cut,
    ) == (1, 1, cut)
    assert len(ds[1]) == n_prompt + 4 and ds[1].labels[:n_prompt] == [-100] * n_prompt  # prompt kept whole
    assert ds[1].input_ids[n_prompt:] == enc(tok, long_answer)[:4]  # the response's start, its end token lost
    assert ds[0].input_ids == short[0].input_ids


def test_bad_input_is_reported_with_counts(tok_dir, tok):
    with pytest.raises(TypeError, match=r"1 non-string response\(s\) \(int\) at rows \[1\]"):
        prepare_dataset(tok, ["a", "b"], ["x", 3])
    with pytest.raises(
        TypeError,
        match=r"2 non-string instruction\(s\) \(NoneType, list\) at rows \[0, 2\]",
    ):
        prepare_dataset(tok, [None, "b", ["c"]], ["x", "y", "z"])
    with pytest.raises(ValueError, match="same length; got 2 instructions, 1 responses"):
        prepare_dataset(tok, ["a", "b"], ["x"])
    with pytest.warns(
        DataWarning,
        match=r"2 of 4 examples have an empty response and were dropped \(rows \[1, 3\]\)",
    ):
        ds = prepare_dataset(tok, ["a", "b", "c", "d"], ["x", "", "z", "  \n"])
    assert len(ds) == 2 and ds.stats.dropped_empty == 2
    with (
        pytest.raises(ValueError, match="all 2 responses are empty"),
        pytest.warns(DataWarning),
    ):
        prepare_dataset(tok, ["a", "b"], ["", ""])
    with pytest.raises(
        ValueError,
        match=r"max_seq_len=5 is too small to hold any response: the shortest prompt has \d+ tokens",
    ):
        prepare_dataset(tok, ["a", "b"], ["x", "y"], max_seq_len=5)
    with pytest.raises(ValueError, match="template must be one of"):
        prepare_dataset(tok, ["a"], ["x"], template="llama")
    with pytest.warns(DataWarning, match=r"1 examples contain a special token"):
        prepare_dataset(tok, ["a <|im_end|> b"], ["x"])


def test_tokenizer_without_the_template_tokens(tmp_path):
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(
        ["hello world"] * 10,
        trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    with pytest.raises(
        ValueError,
        match=r"the tokenizer has no '<\|im_start\|>' token, which the ChatML template needs",
    ):
        prepare_dataset(plain, ["a"], ["x"])
    with pytest.raises(ValueError, match="names no eos_token"):
        prepare_dataset(plain, ["a"], ["x"], template="alpaca")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        prepare_dataset(tmp_path, ["a"], ["x"])


def test_readers_jsonl_json_csv(tmp_path, tok):
    rows = [
        {"instruction": "Say hi", "input": "", "output": "Hi"},
        {"instruction": "Add", "input": "1 2", "output": "3"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))  # yahma/alpaca-cleaned: one JSON array
    (tmp_path / "d.csv").write_text("instruction,input,output\nSay hi,,Hi\nAdd,1 2,3\n")
    want = {
        "instructions": ["Say hi", "Add"],
        "inputs": ["", "1 2"],
        "responses": ["Hi", "3"],
    }
    for name in ("d.jsonl", "d.json", "d.csv"):
        assert read_records(tmp_path / name) == want, name
    (tmp_path / "q.jsonl").write_text(json.dumps({"q": "Say hi", "a": "Hi"}) + "\n")
    assert read_records(tmp_path / "q.jsonl", instruction_column="q", output_column="a") == {
        "instructions": ["Say hi"],
        "inputs": None,
        "responses": ["Hi"],
    }
    assert len(prepare_dataset(tok, **read_records(tmp_path / "d.jsonl"))) == 2


def test_readers_report_missing_columns_and_bad_lines(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        '{"instruction": "a", "output": "x"}\n{"instruction": "b"}\n{"instruction": "c"}\n'
    )
    with pytest.raises(
        ValueError,
        match=r"column 'output' is missing in 2 of 3 records \(lines/items \[2, 3\]\); the file has columns \['instruction', 'output'\]",
    ):
        read_records(tmp_path / "m.jsonl")
    (tmp_path / "m.csv").write_text("prompt,output\na,x\n")
    with pytest.raises(
        ValueError,
        match=r"column 'instruction' is missing in 1 of 1 records .* columns \['output', 'prompt'\]",
    ):
        read_records(tmp_path / "m.csv")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "x"}\n{"instruction": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown file type"):
        read_records(tmp_path / "d.txt")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        read_records(tmp_path / "e.jsonl")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_readers_accept_a_utf8_bom(tmp_path, suffix):
    """Files saved by Excel / Notepad start with a UTF-8 byte order mark."""
    body = {
        ".jsonl": '{"instruction": "a", "output": "x"}\n',
        ".json": '[{"instruction": "a", "output": "x"}]',
        ".csv": "instruction,output\na,x\n",
    }[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert read_records(path) == {"instructions": ["a"], "inputs": None, "responses": ["x"]}
