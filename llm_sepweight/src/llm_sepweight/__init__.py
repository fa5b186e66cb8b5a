"""llm_sepweight: per-layer safetensors storage for LLM checkpoints.

Convert an HF checkpoint once into one file per part (begin / each layer / end) and load any part
memory-mapped::

    import llm_sepweight as sw
    sw.convert("Qwen/Qwen2.5-0.5B", "qwen-sep", dtype="bf16")
    part = sw.load("qwen-sep", "b 0-12")        # PartWeights(begin=..., layers={0..11}, end=None)
    layer = sw.SepWeights("qwen-sep").layer(5)  # one layer, zero-copy views of mid.00005.safetensors
"""

from .atomic import atomic_write_bytes, fsync_dir
from .convert import convert
from .errors import SepweightError
from .folder_lock import FolderBusy, wait_for_writer
from .hugepages import hugepage_coverage, hugepages_available, read_buffer
from .manifest import FORMAT_VERSION, Manifest, part_filename
from .mapping import FileMapping
from .quant import QuantSpec, dequantize, is_linear, quantize_int4, quantize_int8, quantize_linear
from .quant_pack import int4_layout, pack_int4, unpack_int4
from .reader import PartWeights, SepWeights, load
from .safetensors_file import load_safetensors, safetensors_metadata, save_safetensors
from .safetensors_read import read_cpu_seconds
from .spec import PartSpec
from .verify import VerifyReport, verify
from .writer import SepweightWriter, save_part

__version__ = "0.15.0"


def __getattr__(name: str) -> object:
    """``convert_gguf`` / ``open_gguf``: imported on first use (they need the ``[gguf]`` extra's numpy)."""
    if name == "convert_gguf":
        from .gguf_import import convert_gguf

        return convert_gguf
    if name == "open_gguf":
        from .gguf_reader import open_gguf

        return open_gguf
    raise AttributeError(f"module 'llm_sepweight' has no attribute {name!r}")


__all__ = [
    "atomic_write_bytes",
    "fsync_dir",
    "FORMAT_VERSION",
    "FileMapping",
    "FolderBusy",
    "Manifest",
    "PartSpec",
    "PartWeights",
    "QuantSpec",
    "SepWeights",
    "SepweightError",
    "SepweightWriter",
    "VerifyReport",
    "convert",
    "convert_gguf",
    "dequantize",
    "hugepage_coverage",
    "read_buffer",
    "read_cpu_seconds",
    "hugepages_available",
    "int4_layout",
    "is_linear",
    "load",
    "load_safetensors",
    "open_gguf",
    "pack_int4",
    "part_filename",
    "quantize_int4",
    "quantize_int8",
    "quantize_linear",
    "safetensors_metadata",
    "save_part",
    "save_safetensors",
    "unpack_int4",
    "verify",
    "wait_for_writer",
]
