"""Arrow string arrays as raw bytes: zero-copy views of their buffers and little-endian loads from them.

Both hashes read a string as 8-byte (and 4-byte) little-endian words at any byte offset: the numpy paths
through ``ByteWindows`` (one gather per load for all strings), the kernels through ``fetch64``/``fetch32``
(inlined into them; see ``data.ops.jit`` on the cache after editing these).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data.ops.jit import inline

_U = np.uint64


def string_offsets(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The ``[n + 1]`` offsets (int32, or int64 for large_string) of a string array into its UTF-8 byte
    buffer, and that buffer: string i is ``data[offsets[i]:offsets[i + 1]]``. Zero-copy views."""
    offset_type = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    buffers = strings.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[strings.offset : strings.offset + len(strings) + 1]
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


def string_buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start offset and byte length of every string, and the raw UTF-8 byte buffer they index."""
    offsets, data = string_offsets(strings)
    return offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64), data


class ByteWindows:
    """Little-endian loads at any byte offset of a buffer, as single numpy gathers.

    ``w64[i]`` is the uint64 of bytes ``i..i+7`` (``w32`` likewise for 4 bytes): overlapping, unaligned
    strided views over a copy padded with 8 zero bytes, so a load that runs past a string's end (masked by
    the caller) never runs past the buffer. One gather per load instead of gathering 8 single bytes.
    """

    def __init__(self, data: np.ndarray) -> None:
        self.raw = np.zeros(len(data) + 8, dtype=np.uint8)
        self.raw[: len(data)] = data
        self.w64 = np.ndarray((len(data) + 1,), dtype="<u8", buffer=self.raw, strides=(1,))
        self.w32 = np.ndarray((len(data) + 5,), dtype="<u4", buffer=self.raw, strides=(1,))


@inline
def fetch64(data, p):
    # Little-endian 8-byte load at any offset. Unsigned indices: numba skips its negative-index
    # wrap-around for them, which lets LLVM fold the eight byte loads into one unaligned load.
    q = _U(p)
    return (
        _U(data[q])
        | (_U(data[q + _U(1)]) << _U(8))
        | (_U(data[q + _U(2)]) << _U(16))
        | (_U(data[q + _U(3)]) << _U(24))
        | (_U(data[q + _U(4)]) << _U(32))
        | (_U(data[q + _U(5)]) << _U(40))
        | (_U(data[q + _U(6)]) << _U(48))
        | (_U(data[q + _U(7)]) << _U(56))
    )


@inline
def fetch32(data, p):
    q = _U(p)
    return (
        _U(data[q])
        | (_U(data[q + _U(1)]) << _U(8))
        | (_U(data[q + _U(2)]) << _U(16))
        | (_U(data[q + _U(3)]) << _U(24))
    )
