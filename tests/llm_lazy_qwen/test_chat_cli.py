"""``llm-lazy-qwen chat``: answers equal transformers' ``generate`` on ``apply_chat_template`` ids.

A tiny Qwen2 checkpoint (tests/qwen_fixtures.py) gets the official Qwen2.5 chat template (default
system message included). The CLI runs in-process (``main([...])``, stdout captured) and once as the
installed entry point. Every turn's prompt ids and sampled tokens are recorded at llm_sampler's
``sample_stream`` seam and compared with transformers: the rendered conversation with
``apply_chat_template(messages, add_generation_prompt=True)``, the tokens with greedy ``generate``
(PEFT's model for ``--adapter``, transformers' GGUF loader for a ``.gguf``).
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from chat_templates import QWEN25
from tokenizers import Tokenizer

import llm_lazy_qwen.chat as chat_mod
import llm_sepweight as sw
from llm_lazy_qwen import ChatSession, eos_token_ids, load_part
from llm_lazy_qwen.chat import generation_defaults, run_chat
from llm_lazy_qwen.cli import main
from llm_sampler import SamplingParams, TextStream

N = 8  # new tokens per answer
GREEDY = ["--temperature", "0", "--max-new-tokens", str(N)]


@pytest.fixture(scope="module")
def chat_model(qwen_checkpoints, tmp_path_factory):
    """(HF folder with the Qwen2.5 chat template, its sepweight conversion, the transformers model).

    The tiny checkpoint's weights are scaled up 10x: at their init scale greedy decoding repeats one
    token whatever the prompt, which would hide a wrong prompt or cache.
    """
    ckpt = qwen_checkpoints("qwen2")
    root = tmp_path_factory.mktemp("chat")
    hf = root / "hf"
    model = copy.deepcopy(ckpt.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    model.save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt.path / name, hf / name)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": QWEN25}))
    sw.convert(hf, root / "sep", progress=False)
    return hf, root / "sep", model


@pytest.fixture
def turns(monkeypatch):
    """Records (prompt ids, sampled tokens) of every turn at the sample_stream seam."""
    seen: list[tuple[list[int], list[int]]] = []
    real = chat_mod.sample_stream

    def recording(forward, input_ids, *args, **kwargs):
        tokens: list[int] = []
        seen.append((input_ids[0].tolist(), tokens))
        for step in real(forward, input_ids, *args, **kwargs):
            tokens.append(int(step[0]))
            yield step

    monkeypatch.setattr(chat_mod, "sample_stream", recording)
    return seen


def hf_tokenizer(folder: Path, **kw):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, **kw)


def hf_turn(model, tok, messages: list[dict[str, str]], n: int = N) -> tuple[list[int], list[int], str]:
    """Prompt ids, new tokens (up to the first eos, excluded) and their text, as transformers gives them."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id)
    new = out[0, len(ids) :].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return ids, new, tok.decode(new, skip_special_tokens=True)


def scripted(monkeypatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


@pytest.mark.parametrize("kind", ["sepweight", "hf-lazy", "budget"])
def test_answer_equals_generate(chat_model, turns, capsys, tmp_path, kind):
    hf, sep, model = chat_model
    src = {
        "sepweight": [str(sep)],
        "hf-lazy": [str(hf), "--cache-dir", str(tmp_path / "conv"), "--lazy"],
        "budget": [str(sep), "--memory-budget", "64MiB", "--max-context", "256"],
    }[kind]
    assert main(["chat", *src, "--prompt", "Name a colour.", *GREEDY]) == 0
    ids, new, text = hf_turn(model, hf_tokenizer(hf), [{"role": "user", "content": "Name a colour."}])
    assert turns == [(ids, new + [2] * (len(new) < N))]  # Qwen2.5's default system message rendered too
    assert capsys.readouterr().out == text + "\n"
    if kind == "hf-lazy":  # converted once: a second call reuses the folder
        before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "conv").glob("*.safetensors")}
        assert main(["chat", *src, "--prompt", "Name a colour.", *GREEDY]) == 0
        assert capsys.readouterr().out == text + "\n"
        assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "conv").glob("*.safetensors")} == before


def test_max_tokens_is_passed_and_a_longer_prompt_is_prefilled_in_chunks(chat_model, turns, capsys, monkeypatch):
    import llm_lazy_qwen.cli as cli

    hf, sep, model = chat_model
    parts = []

    def spy(*args, **kwargs):
        parts.append(load_part(*args, **kwargs))
        return parts[-1]

    monkeypatch.setattr(cli, "load_part", spy)
    budget = ["--memory-budget", "64MiB", "--max-context", "256", "--max-tokens", "8"]
    assert main(["chat", str(sep), *budget, "--prompt", "Name a colour.", *GREEDY]) == 0
    assert parts[0].max_tokens == 8
    ids, new, text = hf_turn(model, hf_tokenizer(hf), [{"role": "user", "content": "Name a colour."}])
    assert len(ids) > 8 and turns == [(ids, new + [2] * (len(new) < N))]
    assert capsys.readouterr().out == text + "\n"


def test_history_renders_as_apply_chat_template(chat_model, turns, capsys, monkeypatch):
    hf, sep, model = chat_model
    tok = hf_tokenizer(hf)
    scripted(monkeypatch, "Hi there\nAnd 2+2?\n/reset\n\nWhat now?\n")
    assert main(["chat", str(sep), "--system", "Be brief.", *GREEDY]) == 0
    system = {"role": "system", "content": "Be brief."}
    messages, texts = [system], []
    for (ids, new), user in zip(turns, ["Hi there", "And 2+2?", None]):
        if user is None:  # after /reset: the system message only
            messages, user = [system], "What now?"
        messages.append({"role": "user", "content": user})
        want_ids, want_new, text = hf_turn(model, tok, messages)
        assert ids == want_ids
        assert new[: len(want_new)] == want_new
        messages.append({"role": "assistant", "content": text})
        texts.append(text)
    assert len(turns) == 3
    out, err = capsys.readouterr()
    assert out == "".join(t + "\n" for t in texts)
    assert "(conversation cleared)" in err


def test_adapter_equals_peft(chat_model, turns, capsys, tmp_path):
    from peft import LoraConfig, get_peft_model

    hf, sep, model = chat_model
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # B non-zero: the adapter changes the answer
    peft_model.save_pretrained(tmp_path / "adapter")
    assert main(["chat", str(sep), "--adapter", str(tmp_path / "adapter"), "--prompt", "Hi", *GREEDY]) == 0
    messages = [{"role": "user", "content": "Hi"}]
    ids, new, text = hf_turn(peft_model.eval(), hf_tokenizer(hf), messages)
    assert turns[0][0] == ids and turns[0][1][: len(new)] == new
    assert capsys.readouterr().out == text + "\n"
    assert new != hf_turn(model, hf_tokenizer(hf), messages)[1]  # it did apply


def test_ctrl_c_stops_the_answer_not_the_session(chat_model, turns, capsys, monkeypatch):
    hf, sep, model = chat_model
    recording = chat_mod.sample_stream

    def interrupted_once(*args, **kwargs):
        for i, step in enumerate(recording(*args, **kwargs)):
            if i == 3 and len(turns) == 1:
                raise KeyboardInterrupt  # Ctrl-C after 3 tokens of the first answer
            yield step

    monkeypatch.setattr(chat_mod, "sample_stream", interrupted_once)
    scripted(monkeypatch, "First question\nSecond one\n")
    assert main(["chat", str(sep), *GREEDY]) == 0
    tok = hf_tokenizer(hf)
    shown = TextStream(Tokenizer.from_file(str(sep / "tokenizer.json")))
    first = "".join(shown.push(t) for t in turns[0][1][:3])  # what was shown is kept in the history
    messages = [{"role": "user", "content": "First question"}, {"role": "assistant", "content": first}]
    ids, new, text = hf_turn(model, tok, [*messages, {"role": "user", "content": "Second one"}])
    assert turns[1][0] == ids and turns[1][1][: len(new)] == new
    out, err = capsys.readouterr()
    assert out == first + "\n" + text + "\n"
    assert "[answer stopped]" in err


@pytest.mark.parametrize("how", [{"lazy": True}, {"memory_budget": "64MiB"}])
def test_ctrl_c_inside_a_lazy_forward(chat_model, how):
    """A real Ctrl-C lands inside a forward, mid-stream: the next turn still equals transformers."""
    hf, sep, model = chat_model
    part = load_part(sep, "f", **how)
    tokenizer = Tokenizer.from_file(str(sep / "tokenizer.json"))
    session = ChatSession(part, tokenizer, QWEN25, stop_ids=[2], params=SamplingParams(0), max_new_tokens=N)
    calls = 0

    def ctrl_c(module, args):
        nonlocal calls
        calls += 1
        if calls == 4:  # the third decode step, between layer 0 and layer 2
            raise KeyboardInterrupt

    hook = part.model.layers["1"].register_forward_pre_hook(ctrl_c)
    shown = []
    with pytest.raises(KeyboardInterrupt):
        for chunk in session.reply("First question"):
            shown.append(chunk)
    hook.remove()
    assert session.messages[-1] == {"role": "assistant", "content": "".join(shown)}
    answer = "".join(session.reply("Second one"))
    ids, new, text = hf_turn(
        model, hf_tokenizer(hf), [*session.messages[:2], {"role": "user", "content": "Second one"}]
    )
    assert session.last_prompt_ids == ids and session.last_answer_ids == new and answer == text
    part.close()


def test_ctrl_c_at_the_prompt_twice_quits(chat_model, monkeypatch, capsys):
    _, sep, _ = chat_model
    session = ChatSession(load_part(sep), object(), QWEN25)
    presses = iter([KeyboardInterrupt, KeyboardInterrupt, "never read"])

    def fake_input(prompt: str) -> str:
        got = next(presses)
        if got is KeyboardInterrupt:
            raise KeyboardInterrupt
        return got

    monkeypatch.setattr("builtins.input", fake_input)
    assert run_chat(session) == 0
    assert next(presses) == "never read"
    assert "(Ctrl-C again or /exit to quit)" in capsys.readouterr().err
    # once, then a command: the session goes on
    presses = iter([KeyboardInterrupt, "/nope", "/exit"])
    assert run_chat(session) == 0
    assert "unknown command /nope; the commands are /reset" in capsys.readouterr().err


def test_a_failed_turn_is_reported_and_forgotten(chat_model, turns, capsys, monkeypatch, tmp_path):
    hf, sep, model = chat_model
    strict = "{% if messages[-1]['content'] == 'bad' %}{{ raise_exception('no bad words') }}{% endif %}" + QWEN25
    (tmp_path / "strict.jinja").write_text(strict)
    too_long = "many words " * 200  # beyond the tiny model's 256 positions
    scripted(monkeypatch, f"bad\n{too_long}\nHi\n")
    assert main(["chat", str(sep), "--chat-template", str(tmp_path / "strict.jinja"), *GREEDY]) == 0
    out, err = capsys.readouterr()
    assert "error: the chat template failed: no bad words" in err
    assert "tokens and the model serves at most 256 positions; /reset starts a new one" in err
    assert err.count("error:") == 2
    ids, new, text = hf_turn(model, hf_tokenizer(hf), [{"role": "user", "content": "Hi"}])
    assert turns[-1] == (ids, new + [2] * (len(new) < N))  # neither failed turn is in the history
    assert out == "\n\n" + text + "\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/no/such/model"], "/no/such/model: no such folder or file, and not a hub id of the form owner/name"),
        (["missing.gguf"], "missing.gguf: no such GGUF file"),
        (["EMPTY"], "config.json"),
        (["SEP", "--adapter", "/no/adapter"], "/no/adapter"),
        (["SEP", "--temperature", "-1"], "temperature must be a number >= 0"),
        (["SEP", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["SEP", "--memory-budget", "lots"], None),  # argparse's own message, also status 2
    ],
)
def test_bad_input_is_one_line_and_status_2(chat_model, capsys, tmp_path, monkeypatch, args, message):
    _, sep, _ = chat_model
    (tmp_path / "EMPTY").mkdir()
    monkeypatch.chdir(tmp_path)
    args = [str(sep) if a == "SEP" else a for a in args]
    try:
        status = main(["chat", *args, "--prompt", "Hi"])
    except SystemExit as e:  # argparse
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert "Traceback" not in err
    if message is not None:
        assert err.startswith("llm-lazy-qwen: error: ") and err.count("\n") == 1, err
        assert message in err


def test_gguf_model_is_converted_once_next_to_it(tmp_path, turns, capsys):
    from gguf_fixtures import T, linears, tiny_model, write_gguf
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen2", seed=5)
    path = write_gguf(model, tmp_path / "tiny.gguf", linears(T.F32))
    args = ["chat", str(path), "--storage-dtype", "fp32", "--prompt", "Hello", *GREEDY]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "convert -> " in err  # the progress bar
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids, new, text = hf_turn(ref, hf_tokenizer(tmp_path, gguf_file=path.name), [{"role": "user", "content": "Hello"}])
    assert turns[0][0] == ids and turns[0][1][: len(new)] == new
    assert out == text + "\n"
    folder = tmp_path / "tiny-fp32"
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")}
    assert main(args) == 0  # the second call loads the folder next to the file
    assert capsys.readouterr().out == out
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.safetensors")} == before


def test_sampling_defaults_seed_and_stops(chat_model, tmp_path, capsys):
    hf, sep, _ = chat_model
    tokenizer = Tokenizer.from_file(str(sep / "tokenizer.json"))
    assert eos_token_ids(sep, tokenizer) == [2]  # generation_config's eos_token_id; <|im_end|> is the same
    session = ChatSession(load_part(sep), tokenizer, QWEN25, params=SamplingParams(0), max_new_tokens=N)
    answer = "".join(session.reply("Hi"))
    first = session.last_answer_ids[0]
    session = ChatSession(load_part(sep), tokenizer, QWEN25, stop_ids=[first], params=SamplingParams(0))
    assert "".join(session.reply("Hi")) == "" and session.last_answer_ids == []  # the stop ends it, unshown
    assert answer and session.messages[-1] == {"role": "assistant", "content": ""}
    assert generation_defaults(sep)["temperature"] == 0.0  # no do_sample: greedy, as transformers' generate
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 0.8}))
    got = generation_defaults(tmp_path)
    assert got == {"temperature": 1.0, "top_k": 50, "top_p": 0.8, "min_p": None, "repetition_penalty": None}
    SamplingParams(**got)
    sampled = ["chat", str(sep), "--prompt", "Hi", "--temperature", "1.5", "--top-k", "40", "--seed", "7"]
    outs = []
    for _ in range(2):
        assert main([*sampled, "--max-new-tokens", str(N)]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]  # --seed makes it repeatable


def test_entry_point(chat_model):
    _, sep, _ = chat_model
    exe = Path(sys.executable).with_name("llm-lazy-qwen")
    assert exe.is_file(), "the llm-lazy-qwen script is not installed (pip install -e llm_lazy_qwen)"
    run = subprocess.run(
        [str(exe), "chat", str(sep), *GREEDY], input="Hi\n", capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith("\n") and run.stdout.count("\n") >= 1
