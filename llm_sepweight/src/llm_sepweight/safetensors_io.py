"""Read and write the safetensors format without holding a whole file in memory.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``
and then the raw little-endian tensor bytes, offsets relative to the end of the header.

We implement it here (instead of calling ``safetensors.torch``) for three reasons:
- writing streams tensor by tensor in bounded chunks, hashing the bytes as they go, so converting a
  layer never materialises the whole file in anonymous memory (``save_file`` needs every tensor);
- reading returns zero-copy views of a private (copy-on-write) memory map: pages stay file-backed and
  the kernel may drop them under pressure;
- every structural problem is reported with the file name and what is wrong.
Files written here are read by ``safetensors.safe_open`` and vice versa (tested).

One module per concept: :mod:`.safetensors_header` (dtypes, header parsing and validation),
:mod:`.safetensors_read` (memory maps, ``pread`` into buffers), :mod:`.safetensors_write` (streamed
writing, hashing). This module gathers their names for the rest of the package.
"""

from .safetensors_header import DTYPE_NAMES, DTYPES, Header, TensorInfo, read_header
from .safetensors_read import (
    READ_SLACK,
    gather_rows,
    map_unpopulated,
    open_rows,
    open_tensors,
    read_cpu_seconds,
    read_into,
    row_span,
)
from .safetensors_write import TensorSpec, sha256_file, write_file

__all__ = [
    "DTYPE_NAMES",
    "DTYPES",
    "READ_SLACK",
    "Header",
    "TensorInfo",
    "TensorSpec",
    "gather_rows",
    "map_unpopulated",
    "open_rows",
    "open_tensors",
    "read_cpu_seconds",
    "read_header",
    "read_into",
    "row_span",
    "sha256_file",
    "write_file",
]
