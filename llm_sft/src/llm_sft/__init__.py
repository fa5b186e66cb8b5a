"""llm_sft: supervised fine-tuning (LoRA) of Qwen models with a layer-wise, low-memory backward.

Only one layer's weights are resident (streamed from a sepweight folder when the part is lazy);
only the LoRA parameters have gradients and optimizer state; logits exist one vocabulary chunk
at a time. Gradients equal ordinary full-graph autograd::

    from llm_lazy_qwen import load_part
    from llm_lora_mmap import apply_lora, mark_only_lora_trainable, save_adapter
    from llm_sft import prepare_dataset, read_records, sft

    part = load_part("qwen-sep", "f", lazy=True, prefetch=0)
    ds = prepare_dataset("qwen-sep", **read_records("alpaca_data_cleaned.json"), max_seq_len=512)
    apply_lora(part, "all-linear", r=8, lora_alpha=16, lora_dropout=0.05)
    opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=2e-4)
    log = sft(part, ds, opt, batch_size=4, epochs=1, checkpoint_dir="ckpt")
    save_adapter(part, "my-adapter")          # PEFT format
"""

from llm_lazy_qwen import read_chat_template, render_chat  # one renderer for training and serving

from .batching import Batch, batch_indices, collate
from .checkpoint import latest_checkpoint
from .data import (
    IGNORE_INDEX,
    DataWarning,
    Example,
    PrepareStats,
    SFTDataset,
    load_tokenizer,
    prepare_dataset,
    read_records,
)
from .distributed import init_distributed, local_device
from .engine import LayerwiseEngine, StepLoss, chunked_cross_entropy
from .heap import bound_heap
from .memory import training_reserve
from .report import plot_losses, write_loss_log
from .schedule import warmup_cosine
from .trainer import StepInfo, evaluate, sft, steps_per_epoch

__version__ = "0.3.0"

__all__ = [
    "bound_heap",
    "training_reserve",
    "IGNORE_INDEX",
    "Batch",
    "DataWarning",
    "Example",
    "LayerwiseEngine",
    "PrepareStats",
    "SFTDataset",
    "StepInfo",
    "StepLoss",
    "batch_indices",
    "chunked_cross_entropy",
    "collate",
    "evaluate",
    "init_distributed",
    "latest_checkpoint",
    "load_tokenizer",
    "local_device",
    "plot_losses",
    "prepare_dataset",
    "read_chat_template",
    "read_records",
    "render_chat",
    "sft",
    "steps_per_epoch",
    "warmup_cosine",
    "write_loss_log",
]
