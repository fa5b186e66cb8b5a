"""llm_lora_mmap: LoRA over memory-mapped frozen weights, with PEFT-compatible adapter files.

The frozen weights stay zero-copy views of safetensors files (file-backed pages the kernel may
drop); only the small A and B matrices live in RAM and get gradients::

    from llm_lazy_qwen import load_part
    from llm_lora_mmap import apply_lora, mark_only_lora_trainable, save_adapter
    part = load_part("qwen-sep", "f")                       # weights mmapped from the sepweight folder
    apply_lora(part, ["q_proj", "v_proj"], r=16, lora_alpha=32)
    opt = torch.optim.AdamW(mark_only_lora_trainable(part), lr=2e-4)
    ...                                                     # forward, loss.backward(), opt.step()
    save_adapter(part, "my-adapter")                        # loads in peft.PeftModel.from_pretrained

QLoRA: the same calls on a part loaded from a quantized (int8/int4) folder wrap its QuantLinears.
"""

from .apply import apply_lora, find_targets, lora_layers, mark_only_lora_trainable
from .config import LoraConfig
from .errors import LoraError
from .layer import LoraLinear, frozen_linear, is_linear_like
from .merge import merge_adapter, merged_weight
from .peft_io import load_adapter, read_adapter, save_adapter

__version__ = "0.2.1"

__all__ = [
    "LoraConfig",
    "LoraError",
    "LoraLinear",
    "apply_lora",
    "find_targets",
    "frozen_linear",
    "is_linear_like",
    "load_adapter",
    "lora_layers",
    "mark_only_lora_trainable",
    "merge_adapter",
    "merged_weight",
    "read_adapter",
    "save_adapter",
]
