"""Demo steps 7-8: fine-tune LoRA adapters with llm_sft, then answer questions it never trained on.

The real model learns a rule: a date in words becomes ISO 8601 (``Convert 16 May 2019 to YYYY-MM-DD.``
-> ``2019-05-16``). SmolLM2-135M-Instruct cannot do it (it echoes the date back). Training and held-out
questions hold different dates (demo/data/dates_train.jsonl, dates_heldout.jsonl, written by
make_dates.py); an answer counts as correct when it is exactly the expected text. A second column says
whether the answer contains the expected text at all (in any wording).

(A first try taught capital-city questions answered with the city alone: the format was learned, but
the 135M model recalls a capital only after its own "The capital of X is" and the held-out answers
became wrong cities. A rule it can apply to new input generalises; a format that removes its recall
scaffold does not.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from step_chat import load_chat_tokenizer, prompt_ids


@dataclass
class Task:
    name: str
    train: Path
    heldout: Path | None  # None: the tiny random model, scored on its training questions
    lr: float
    warmup_steps: int


def answers(part: torch.nn.Module, folder: Path, questions: list[str], max_new: int) -> list[str]:
    """Greedy answers to single-turn questions (one left-padded batch), cut at the end token."""
    from llm_lazy_qwen import IncrementalPart
    from llm_sampler import CachedForward, pad_left, sample

    tok, ends = load_chat_tokenizer(folder)
    prompts = [prompt_ids(folder, tok, [{"role": "user", "content": q}]) for q in questions]
    ids, mask = pad_left(prompts, ends[0])  # (B, T); the mask, not the id, marks padding
    with torch.inference_mode():
        fwd = CachedForward(IncrementalPart(part))
        new = sample(fwd, ids, max_new, temperature=0, attention_mask=mask, stop_tokens=ends, pad_token_id=ends[0])
    out = []
    for row in new.tolist():
        cut = min((row.index(e) for e in ends if e in row), default=len(row))
        out.append(tok.decode(row[:cut]).strip())
    return out


def exact(got: list[str], truths: list[str]) -> float:
    """Fraction of answers that are exactly the expected text (surrounding whitespace ignored)."""
    return sum(g == t for g, t in zip(got, truths)) / len(truths)


def names(got: list[str], truths: list[str]) -> float:
    """Fraction of answers that contain the expected text anywhere (case-insensitive)."""
    return sum(t.casefold() in g.casefold() for g, t in zip(got, truths)) / len(truths)


def finetune(
    folder: Path, work: Path, task: Task, epochs: int, lora_layers: int | None, max_new: int
) -> dict[str, Any]:
    """Answer, train LoRA on ``task.train``, answer again; the adapter and loss log go to ``work``."""
    from llm_lazy_qwen import load_part
    from llm_lora_mmap import apply_lora, mark_only_lora_trainable, save_adapter
    from llm_sft import prepare_dataset, read_records, sft, steps_per_epoch, warmup_cosine, write_loss_log

    train = read_records(task.train)
    evals = read_records(task.heldout) if task.heldout else train
    leaked = set(train["instructions"]) & set(evals["instructions"]) if task.heldout else set()
    assert not leaked, f"held-out questions in the training data: {sorted(leaked)}"
    questions, truths = evals["instructions"], evals["responses"]
    part = load_part(folder, "f", lazy=True, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    before = answers(part, folder, questions, max_new)
    eval_s = time.perf_counter() - t0

    ds = prepare_dataset(folder, **train, max_seq_len=64)
    layers = part.config.num_hidden_layers
    first = layers - (lora_layers or layers)
    # LoRA on the top layers only: the layer-wise backward stops below the lowest trainable layer
    targets = rf".*layers\.({'|'.join(str(i) for i in range(first, layers))})\.(self_attn|mlp)\.\w+_proj"
    apply_lora(part, targets if first else "all-linear", r=16, lora_alpha=32)
    params = mark_only_lora_trainable(part)
    batch = 8
    opt = torch.optim.AdamW(params, lr=task.lr, weight_decay=0.0)
    total = steps_per_epoch(len(ds), batch) * epochs
    sched = warmup_cosine(opt, warmup_steps=min(task.warmup_steps, total // 2), total_steps=total)
    t0 = time.perf_counter()
    log = sft(part, ds, opt, batch_size=batch, epochs=epochs, lr_scheduler=sched, max_grad_norm=1.0, progress=True)
    train_s = time.perf_counter() - t0
    adapter = work / "adapter"
    save_adapter(part, adapter)
    files = write_loss_log(log, work)

    part.eval()
    after = answers(part, folder, questions, max_new)
    part.close()
    return {
        "task": task.name,
        "heldout": task.heldout is not None,
        "questions": questions,
        "truths": truths,
        "before": before,
        "after": after,
        "losses": [s.loss for s in log],
        "train_s": train_s,
        "eval_s": eval_s,
        "train_examples": len(ds),
        "lora_layers": f"{first}-{layers - 1}",
        "adapter": str(adapter),
        "loss_files": [str(p) for p in files.values()],
    }


def show_training(r: dict[str, Any]) -> tuple[str, str]:
    """Print step 7's loss curve; return its summary row."""
    losses = r["losses"]
    every = max(1, len(losses) // 8)
    print("loss:", " ".join(f"{losses[i]:.3f}" for i in range(0, len(losses), every)), f"... {losses[-1]:.3f}")
    print(f"LoRA r=16 on every projection of layers {r['lora_layers']}, {r['train_examples']} examples")
    print(f"adapter (PEFT format): {r['adapter']}; loss log and curve: {', '.join(r['loss_files'])}")
    row = f"{len(losses)} steps in {r['train_s']:.0f} s, loss {losses[0]:.2f} -> {losses[-1]:.2f}"
    return ("fine-tune", row)


def show_answers(r: dict[str, Any], shown: int = 24) -> tuple[str, str]:
    """Print step 8's before / after table (the first ``shown`` questions); return its summary row."""
    q, t, b, a = r["questions"], r["truths"], r["before"], r["after"]
    which = "held-out questions (not in the training data)" if r["heldout"] else "training questions"
    width = min(44, max(len(x) for x in q) + 2)
    print(f"{'question':<{width}}{'before':<30}{'after':<16}{'expected':<12}")
    for i in range(min(shown, len(q))):
        mark = "ok" if a[i] == t[i] else ""
        print(f"{q[i][: width - 2]:<{width}}{b[i][:28]!r:<30}{a[i][:14]!r:<16}{t[i]:<12}{mark}")
    n = len(t)
    print(f"exactly the expected answer: before {exact(b, t):.0%}, after {exact(a, t):.0%} of the {n} {which}")
    print(f"names the expected answer (any wording): before {names(b, t):.0%}, after {names(a, t):.0%}")
    kind = "held-out" if r["heldout"] else "training"
    return ("answers correct", f"{exact(b, t):.0%} before -> {exact(a, t):.0%} after ({n} {kind} questions, exact)")
