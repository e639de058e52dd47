"""MurmurHash64A (Austin Appleby's MurmurHash2, 64-bit variant "A"): scalar reference, numpy path, kernel.

RecIS's ``hash_type="murmur"``: the seed-0 hash of a value's UTF-8 bytes. Three implementations of the
same function, from the slowest and plainest to the fastest:

* ``murmurhash64a(data, seed)``: plain Python, written straight from the reference definition; it exists
  to pin the other two down in tests;
* ``murmurhash64a_strings(array, seed)``: a whole Arrow string array with numpy ``uint64`` arithmetic
  (which wraps modulo 2**64 like the C code), all strings advancing one 8-byte block per step;
* ``murmur_ids``: the numba kernel, one loop over the Arrow buffers that hashes and buckets every string
  (``data.ops.buckets.hash_ids`` calls it); None without numba.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data.ops.jit import kernel
from data.ops.strings import ByteWindows, fetch64, string_buffers

_MASK64 = (1 << 64) - 1
M = 0xC6A4A7935BD1E995  # the multiplier
R = 47  # the shift

# ------------------------------------------------------------------------------------- scalar reference


def murmurhash64a(data: bytes, seed: int = 0) -> int:
    """Scalar reference MurmurHash64A, written straight from the reference definition.

    Slow (pure Python); it exists to pin down the vectorised implementation in tests.
    """
    length = len(data)
    h = (seed ^ (length * M)) & _MASK64
    nblocks = length // 8
    for i in range(nblocks):
        k = int.from_bytes(data[8 * i : 8 * i + 8], "little")
        k = (k * M) & _MASK64
        k ^= k >> R
        k = (k * M) & _MASK64
        h ^= k
        h = (h * M) & _MASK64
    tail = data[8 * nblocks :]
    if tail:
        # The reference's fall-through switch: XOR tail byte i at bit 8*i, then one multiply.
        for i in range(len(tail) - 1, -1, -1):
            h ^= tail[i] << (8 * i)
        h = (h * M) & _MASK64
    h ^= h >> R
    h = (h * M) & _MASK64
    h ^= h >> R
    return h


# ----------------------------------------------------------------------------------------------- numpy

# Every constant is a uint64, in numpy's arithmetic as in numba's: numba promotes uint64 mixed with a
# signed int to float64.
_U = np.uint64
_M = _U(M)
_R = _U(R)
_ONE = _U(1)


def murmurhash64a_strings(strings: pa.Array, seed: int = 0) -> np.ndarray:
    """MurmurHash64A of every string of a (non-null) string/large_string array, as ``uint64``.

    All strings advance together one 8-byte block per step (a mask selects the strings that still have a
    full block, skipped while all do), so the Python loop runs ``max_len / 8`` times, never once per string.
    """
    if strings.null_count:
        raise ValueError("cannot hash null strings")
    n = len(strings)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    starts, lengths, data = string_buffers(strings)
    words = ByteWindows(data).w64
    # uint64 array arithmetic wraps modulo 2**64, which is exactly the hash's arithmetic. In-place ops and one
    # scratch array: at a stripe's size the hash is bound by the number of numpy passes and allocations.
    with np.errstate(over="ignore"):
        h = lengths.astype(np.uint64)
        h *= _M
        h ^= np.uint64(seed)
        scratch = np.empty(n, dtype=np.uint64)
        nblocks = lengths >> 3
        fewest = int(nblocks.min())
        pos = starts.copy()  # next block of every string
        for block in range(int(nblocks.max())):
            active = None if block < fewest else nblocks > block
            k = words[pos] if active is None else words[pos[active]]
            k *= _M
            k ^= k >> _R
            k *= _M
            if active is None:
                h ^= k
                h *= _M
                pos += 8
            else:
                h[active] = (h[active] ^ k) * _M
                pos[active] += 8
        rem = lengths & 7
        low, high = int(rem.min()), int(rem.max())
        if high:
            # The reference XORs the 1..7 tail bytes in little-endian order: one masked 8-byte load.
            tail = words[pos]
            if low == high:  # e.g. fixed-width ids or timestamps: one scalar mask
                tail &= np.uint64((1 << (8 * low)) - 1)
                h ^= tail
                h *= _M
            else:
                tail &= (np.uint64(1) << (rem.astype(np.uint64) << np.uint64(3))) - np.uint64(1)
                h ^= tail  # 0 where there is no tail
                has_tail = rem > 0
                h[has_tail] *= _M
        np.right_shift(h, _R, out=scratch)
        h ^= scratch
        h *= _M
        np.right_shift(h, _R, out=scratch)
        h ^= scratch
    return h


# ---------------------------------------------------------------------------------------------- kernel


# The hash is written out inside the loop over strings: as a separate (inlined) function its block loop
# compiled about 4x slower per string.
@kernel
def murmur_ids(data, offsets, seed, operand, modulo, out):
    """``out[i]``: the hash of string i (``data[offsets[i]:offsets[i + 1]]``), then ``% operand`` with
    ``modulo``, else ``& operand``; ``seed`` and ``operand`` are uint64."""
    limit = len(data) - 8  # the tail's masked 8-byte load stays inside the buffer up to here
    for i in range(len(out)):
        p = offsets[i]
        n = offsets[i + 1] - p
        h = seed ^ (_U(n) * _M)
        end = p + (n & ~7)
        while p < end:
            k = fetch64(data, p) * _M
            k ^= k >> _R
            h ^= k * _M
            h *= _M
            p += 8
        rem = n & 7
        if rem:
            # The reference's fall-through switch: tail byte j XORed in at bit 8*j, then one multiply.
            if p <= limit:
                h ^= fetch64(data, p) & ((_ONE << _U(8 * rem)) - _ONE)
            else:
                for j in range(rem):
                    h ^= _U(data[p + j]) << _U(8 * j)
            h *= _M
        h ^= h >> _R
        h *= _M
        h ^= h >> _R
        out[i] = np.int64(h % operand) if modulo else np.int64(h & operand)
