"""Child process of test_memory.py: how RssAnon / RssFile grow when a LoRA-wrapped part is loaded and trained.

    python mem_child.py SEPWEIGHT_DIR MODE     # MODE: ram | lazy | copied (control: weights copied into RAM)

Prints one JSON line: growth above the baseline taken after all imports, in KiB.
"""

import json
import sys

import torch

from llm_lazy_qwen import load_part
from llm_lora_mmap import apply_lora, mark_only_lora_trainable


def status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return {k: int(d[k].split()[0]) for k in ("RssAnon", "RssFile")}


def main() -> None:
    folder, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    tokens = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
    # one-time costs that do not depend on the model: building modules on the meta device imports
    # torch's meta-tensor machinery (~65 MB of Python objects), and the first autograd step sets up its engine
    torch.nn.Embedding(2, 2, device="meta")
    x = torch.randn(4, 8, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None]).sum().backward()
    before = status()
    part = load_part(folder, "f", lazy=mode == "lazy", stream_mode="mmap")
    if mode == "copied":  # what a LoRA that densifies or upcasts W would cost: every weight in anonymous memory
        for p in part.parameters():
            p.data = p.data.clone()
    apply_lora(part, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=8, lora_alpha=16)
    params = mark_only_lora_trainable(part)
    opt = torch.optim.AdamW(params, lr=1e-3)
    peak = dict(before)
    for _ in range(2):
        logits = part(tokens)  # the autograd graph of the whole part is alive here
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
        now = status()
        peak = {k: max(peak[k], now[k]) for k in peak}
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        now = status()
        peak = {k: max(peak[k], now[k]) for k in peak}
    lora_kib = sum(p.numel() * p.element_size() for p in params) / 1024
    print(
        json.dumps(
            {
                "anon_kib": peak["RssAnon"] - before["RssAnon"],
                "file_kib": peak["RssFile"] - before["RssFile"],
                "lora_kib": lora_kib,
                "loss": loss.item(),
            }
        )
    )


if __name__ == "__main__":
    main()
