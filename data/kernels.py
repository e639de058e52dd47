"""Compiled per-value kernels of the reader (numba, GIL released), with the numpy paths as the fallback.

Why compiled: on a 2-core machine the reader's own work (hashing the string columns, laying batches out)
cost as much CPU as pyarrow's decode, and its numpy version is many array passes per 8-byte block or per
batch, each holding the GIL between passes. One compiled loop per array does the same work in a fraction
of the time and releases the GIL for all of it, so decode threads overlap for real.

Each kernel here has a numpy twin elsewhere (``data.hashing``, ``data.farmhash``, ``data.reader``) that is
used when numba cannot be imported (a platform or Python version without numba wheels) or when
``SEQREC_NO_NUMBA=1`` is set; tests check both give the same bits. ``enabled()`` says which path runs, and
the first call logs it once.

Kernels are compiled on first use and cached on disk (``cache=True``: ``data/__pycache__``, or numba's
user-wide cache when that is read-only; compiled per process where neither is writable), so a later
process loads them in about 0.1 s instead of compiling them again (seconds).
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np

logger = logging.getLogger(__name__)

try:  # numba is a dependency (setup.cfg), but the reader still works, slower, without it.
    if os.environ.get("SEQREC_NO_NUMBA", "") not in ("", "0"):
        raise ImportError("SEQREC_NO_NUMBA is set")
    from numba import njit

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    njit = None
    _IMPORT_ERROR = str(exc)

_announced = threading.Event()


def enabled() -> bool:
    """True when the compiled kernels run (numba importable and not disabled); logs the choice once."""
    if not _announced.is_set():
        _announced.set()
        if njit is None:
            logger.warning(
                "numba unavailable (%s): the reader hashes and lays out batches with numpy, several times "
                "slower per value; install numba (setup.cfg pins it) for the compiled kernels",
                _IMPORT_ERROR,
            )
        else:
            logger.info("reader kernels: numba (compiled, GIL released)")
    return njit is not None


INT64_MAX = (1 << 63) - 1

if njit is not None:

    def _compiled(**options):  # noqa: ANN202 - a decorator factory
        def decorate(fn):  # noqa: ANN001, ANN202
            try:
                return njit(nogil=True, cache=True, **options)(fn)
            except RuntimeError:  # no writable cache location (read-only install and home): compile per process
                return njit(nogil=True, **options)(fn)

        return decorate

    _jit = _compiled(boundscheck=False)
    _inline = _compiled(inline="always")

    # Every constant is a uint64: numba promotes uint64 mixed with a signed int to float64.
    _U = np.uint64
    _M = _U(0xC6A4A7935BD1E995)  # MurmurHash64A multiplier
    _R = _U(47)
    _K0 = _U(0xC3A5C85C97CB3127)  # farmhash constants
    _K1 = _U(0xB492B66FBE98F273)
    _K2 = _U(0x9AE16A3B2F90404F)
    _Z = _U(0)
    _ONE = _U(1)
    _TWO = _U(2)
    _NINE = _U(9)
    _FF = _U(0xFF)
    _SEED = _U(81)
    _SEED_Y = _U((81 * 0xB492B66FBE98F273 + 113) & ((1 << 64) - 1))

    @_inline
    def _fetch64(data, p):
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

    @_inline
    def _fetch32(data, p):
        q = _U(p)
        return (
            _U(data[q])
            | (_U(data[q + _U(1)]) << _U(8))
            | (_U(data[q + _U(2)]) << _U(16))
            | (_U(data[q + _U(3)]) << _U(24))
        )

    @_inline
    def _rot(v, shift):
        return (v >> _U(shift)) | (v << _U(64 - shift))

    @_inline
    def _mix(v):
        return v ^ (v >> _R)

    @_inline
    def _len16(u, v, mul):
        a = _mix((u ^ v) * mul)
        b = _mix((v ^ a) * mul)
        return b * mul

    @_inline
    def _farm_0_to_16(data, s, n):
        un = _U(n)
        if n >= 8:
            mul = _K2 + un * _TWO
            a = _fetch64(data, s) + _K2
            b = _fetch64(data, s + n - 8)
            return _len16(_rot(b, 37) * mul + a, (_rot(a, 25) + b) * mul, mul)
        if n >= 4:
            a = _fetch32(data, s)
            return _len16(un + (a << _U(3)), _fetch32(data, s + n - 4), _K2 + un * _TWO)
        if n > 0:
            y = _U(data[s]) + (_U(data[s + (n >> 1)]) << _U(8))
            z = un + (_U(data[s + n - 1]) << _TWO)
            return _mix((y * _K2) ^ (z * _K0)) * _K2
        return _K2

    @_inline
    def _farm_17_to_32(data, s, n):
        mul = _K2 + _U(n) * _TWO
        a = _fetch64(data, s) * _K1
        b = _fetch64(data, s + 8)
        c = _fetch64(data, s + n - 8) * mul
        d = _fetch64(data, s + n - 16) * _K2
        return _len16(_rot(a + b, 43) + _rot(c, 30) + d, a + _rot(b + _K2, 18) + c, mul)

    @_inline
    def _farm_33_to_64(data, s, n):
        mul = _K2 + _U(n) * _TWO
        a = _fetch64(data, s) * _K2
        b = _fetch64(data, s + 8)
        c = _fetch64(data, s + n - 8) * mul
        d = _fetch64(data, s + n - 16) * _K2
        y = _rot(a + b, 43) + _rot(c, 30) + d
        z = _len16(y, a + _rot(b + _K2, 18) + c, mul)
        e = _fetch64(data, s + 16) * mul
        f = _fetch64(data, s + 24)
        g = (y + _fetch64(data, s + n - 32)) * mul
        h = (z + _fetch64(data, s + n - 24)) * mul
        return _len16(_rot(e + f, 43) + _rot(g, 30) + h, e + _rot(f + a, 18) + g, mul)

    @_inline
    def _weak32(data, p, a, b):
        """``WeakHashLen32WithSeeds`` over the 32 bytes at ``p``: the new (a, b) pair."""
        w = _fetch64(data, p)
        x = _fetch64(data, p + 8)
        y = _fetch64(data, p + 16)
        z = _fetch64(data, p + 24)
        a += w
        b = _rot(b + a + z, 21)
        c = a
        a += x + y
        b += _rot(a, 44)
        return a + z, b + c

    @_inline
    def _farm_over_64(data, s, n):
        x = _SEED
        y = _SEED_Y
        z = _mix(y * _K2 + _U(113)) * _K2
        v0 = _Z
        v1 = _Z
        w0 = _Z
        w1 = _Z
        x = x * _K2 + _fetch64(data, s)
        # Every full 64-byte block but the last; the tail step re-reads the string's last 64 bytes.
        p = s
        end = s + ((n - 1) // 64) * 64
        while p < end:
            x = _rot(x + y + v0 + _fetch64(data, p + 8), 37) * _K1
            y = _rot(y + v1 + _fetch64(data, p + 48), 42) * _K1
            x ^= w1
            y += v0 + _fetch64(data, p + 40)
            z = _rot(z + w0, 33) * _K1
            v0, v1 = _weak32(data, p, v1 * _K1, x + w0)
            w0, w1 = _weak32(data, p + 32, z + w1, y + _fetch64(data, p + 16))
            z, x = x, z
            p += 64
        mul = _K1 + ((z & _FF) << _ONE)
        p = s + n - 64
        w0 += _U((n - 1) & 63)
        v0 += w0
        w0 += v0
        x = _rot(x + y + v0 + _fetch64(data, p + 8), 37) * mul
        y = _rot(y + v1 + _fetch64(data, p + 48), 42) * mul
        x ^= w1 * _NINE
        y += v0 * _NINE + _fetch64(data, p + 40)
        z = _rot(z + w0, 33) * mul
        v0, v1 = _weak32(data, p, v1 * mul, x + w0)
        w0, w1 = _weak32(data, p + 32, z + w1, y + _fetch64(data, p + 16))
        z, x = x, z
        return _len16(_len16(v0, w0, mul) + _mix(y) * _K0 + z, _len16(v1, w1, mul) + x, mul)

    @_inline
    def _farm(data, s, n):
        if n <= 16:
            return _farm_0_to_16(data, s, n)
        if n <= 32:
            return _farm_17_to_32(data, s, n)
        if n <= 64:
            return _farm_33_to_64(data, s, n)
        return _farm_over_64(data, s, n)

    # MurmurHash64A is written out inside the loop over strings: as a separate (inlined) function its block
    # loop compiled about 4x slower per string.
    @_jit
    def _murmur_ids(data, offsets, seed, operand, modulo, out):
        limit = len(data) - 8  # the tail's masked 8-byte load stays inside the buffer up to here
        for i in range(len(out)):
            p = offsets[i]
            n = offsets[i + 1] - p
            h = seed ^ (_U(n) * _M)
            end = p + (n & ~7)
            while p < end:
                k = _fetch64(data, p) * _M
                k ^= k >> _R
                h ^= k * _M
                h *= _M
                p += 8
            rem = n & 7
            if rem:
                # The reference's fall-through switch: tail byte j XORed in at bit 8*j, then one multiply.
                if p <= limit:
                    h ^= _fetch64(data, p) & ((_ONE << _U(8 * rem)) - _ONE)
                else:
                    for j in range(rem):
                        h ^= _U(data[p + j]) << _U(8 * j)
                h *= _M
            h ^= h >> _R
            h *= _M
            h ^= h >> _R
            out[i] = np.int64(h % operand) if modulo else np.int64(h & operand)

    @_jit
    def _farm_ids(data, offsets, operand, modulo, out):
        for i in range(len(out)):
            h = _farm(data, offsets[i], offsets[i + 1] - offsets[i])
            out[i] = np.int64(h % operand) if modulo else np.int64(h & operand)

    @_jit
    def _cut_positions(outer, inner, nested, holdout, seq_len, keep_newest, check_length):
        # See cut_positions. Positions of row r are outer[r]..outer[r+1]; position p's values are
        # inner[p]..inner[p+1] when nested (list<list<T>>), else the single value p.
        rows = len(outer) - 1
        pos_offsets = np.empty(rows + 1, dtype=np.int64)
        pos_offsets[0] = 0
        for r in range(rows):
            n = max(outer[r + 1] - outer[r] - holdout, 0)
            if check_length and n > seq_len:
                return pos_offsets, pos_offsets, pos_offsets, pos_offsets, pos_offsets, pos_offsets, False, r
            pos_offsets[r + 1] = pos_offsets[r] + min(n, seq_len)
        positions = pos_offsets[1:] - pos_offsets[:-1]
        bag_lengths = np.empty(pos_offsets[rows], dtype=np.int64)
        bag_offsets = np.empty(pos_offsets[rows] + 1, dtype=np.int64)
        bag_offsets[0] = 0
        leaf_start = np.empty(rows, dtype=np.int64)
        leaf_stop = np.empty(rows, dtype=np.int64)
        contiguous = True
        o = 0
        for r in range(rows):
            k = positions[r]
            first = outer[r] + (max(outer[r + 1] - outer[r] - holdout, 0) - k if keep_newest else 0)
            for t in range(k):
                bag = inner[first + t + 1] - inner[first + t] if nested else 1
                bag_lengths[o + t] = bag
                bag_offsets[o + t + 1] = bag_offsets[o + t] + bag
            leaf_start[r] = inner[first] if nested else first
            leaf_stop[r] = inner[first + k] if nested else first + k
            o += k
            if r > 0 and leaf_start[r] != leaf_stop[r - 1]:
                contiguous = False
        return positions, bag_lengths, pos_offsets, bag_offsets, leaf_start, leaf_stop, contiguous, -1

    @_jit
    def _map_ints(values, operand, modulo, bucketed, out):
        # Returns the index of the first invalid id (negative with a bucket, outside [0, operand) without).
        for i in range(len(values)):
            v = values[i]
            if bucketed:
                if v < 0:
                    return i
                out[i] = v % operand if modulo else v & operand
            else:
                if v < 0 or v >= operand:
                    return i
                out[i] = v
        return -1

    # Both fills write every slot of a user's padded row exactly once (values, then padding), so the output
    # needs no separate zeroing pass: at a block's size these loops are bound by memory traffic.
    @_jit
    def _fill_lengths(positions, pos_offsets, bag_lengths, row_base, row_len, out):
        # Slice assignments: numba lowers them to tight copy loops (a third faster here than indexing).
        for r in range(len(positions)):
            src = pos_offsets[r]
            dst = row_base[r]
            n = positions[r]
            out[dst : dst + n] = bag_lengths[src : src + n]
            out[dst + n : dst + row_len[r]] = 0

    @_jit
    def _fill_items(positions, pos_offsets, bag_lengths, bag_offsets, values, row_base, row_len, out):
        for r in range(len(positions)):
            src = pos_offsets[r]
            dst = row_base[r]
            n = positions[r]
            for t in range(n):
                p = src + t
                out[dst + t] = values[bag_offsets[p]] if bag_lengths[p] > 0 else -1
            for t in range(n, row_len[r]):
                out[dst + t] = -1

    @_jit
    def _copy_ranges(source, starts, stops, dest, out):
        for j in range(len(starts)):
            out[dest[j] : dest[j] + stops[j] - starts[j]] = source[starts[j] : stops[j]]


_ALL_BITS = (1 << 64) - 1


def _hash(data: np.ndarray, offsets: np.ndarray, hash_type: str, seed: int, operand: int, modulo: bool) -> np.ndarray:
    out = np.empty(len(offsets) - 1, dtype=np.int64)
    if hash_type == "farm":
        _farm_ids(data, offsets, np.uint64(operand), modulo, out)
    else:
        _murmur_ids(data, offsets, np.uint64(seed), np.uint64(operand), modulo, out)
    return out


def hash_strings(data: np.ndarray, offsets: np.ndarray, hash_type: str, seed: int = 0) -> np.ndarray:
    """uint64 MurmurHash64A (``hash_type="murmur"``, seeded) or FarmHash Fingerprint64 (``"farm"``) of the
    strings ``data[offsets[i]:offsets[i+1]]`` (Arrow string layout)."""
    return _hash(data, offsets, hash_type, seed, _ALL_BITS, False).view(np.uint64)


def hash_ids(data: np.ndarray, offsets: np.ndarray, hash_type: str, bucket: int) -> np.ndarray:
    """int64 ids: the seed-0 hash of every string, then ``% bucket`` (bucket > 0) or ``& INT64_MAX``."""
    # Power-of-two buckets by mask: a 64-bit division per value costs more than the hash of a short string.
    if bucket == 0 or bucket & (bucket - 1) == 0:
        return _hash(data, offsets, hash_type, 0, INT64_MAX if bucket == 0 else bucket - 1, False)
    return _hash(data, offsets, hash_type, 0, bucket, True)


def cut_positions(
    outer: np.ndarray,
    inner: np.ndarray | None,
    holdout: int,
    seq_len: int,
    keep_newest: bool,
    check_length: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool, int]:
    """Hold out, check and truncate the positions of a ``list<T>`` (``inner`` None) or ``list<list<T>>``
    column in one pass, from its Arrow offsets.

    Per row: the last ``holdout`` positions are dropped; then, with ``check_length``, more than ``seq_len``
    left is an error; then at most ``seq_len`` are kept, the newest (last) ones with ``keep_newest``
    (``truncate_side = "left"``), else the first ones. Returns (positions kept per row, values per kept
    position, their exclusive prefix sums ``[rows + 1]`` and ``[positions + 1]``, first and one-past-last
    leaf index kept per row, whether those leaf ranges follow each other without gaps, index of the first
    row too long for ``check_length`` or -1; the arrays are meaningless when that index is not -1).
    """
    nested = inner is not None
    return _cut_positions(outer, inner if nested else outer, nested, holdout, seq_len, keep_newest, check_length)


def map_ints(values: np.ndarray, bucket: int, num_embeddings: int) -> tuple[np.ndarray, int]:
    """int64 ids of integer ids: ``% bucket`` (bucket > 0; ids must be >= 0) or checked to lie in
    ``[0, num_embeddings)``. Returns (ids, index of the first invalid id or -1)."""
    out = np.empty(len(values), dtype=np.int64)
    if bucket > 0:
        masked = bucket & (bucket - 1) == 0
        bad = _map_ints(values, bucket - 1 if masked else bucket, not masked, True, out)
    else:
        bad = _map_ints(values, num_embeddings, False, False, out)
    return out, int(bad)


def fill_lengths(
    positions: np.ndarray,
    pos_offsets: np.ndarray,
    bag_lengths: np.ndarray,
    row_base: np.ndarray,
    row_len: np.ndarray,
    out: np.ndarray,
) -> None:
    """Row r's padded bags ``out[row_base[r]:row_base[r] + row_len[r]]``: its bag lengths
    (``bag_lengths[pos_offsets[r]:]``, ``positions[r]`` of them), then zeros."""
    _fill_lengths(positions, pos_offsets, bag_lengths, row_base, row_len, out)


def fill_items(
    positions: np.ndarray,
    pos_offsets: np.ndarray,
    bag_lengths: np.ndarray,
    bag_offsets: np.ndarray,
    values: np.ndarray,
    row_base: np.ndarray,
    row_len: np.ndarray,
    out: np.ndarray,
) -> None:
    """Row r's padded targets ``out[row_base[r]:row_base[r] + row_len[r]]``: the first value of each of its
    positions (-1 for an empty one), then -1."""
    _fill_items(positions, pos_offsets, bag_lengths, bag_offsets, values, row_base, row_len, out)


def copy_ranges(source: np.ndarray, starts: np.ndarray, stops: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
    """``out[dest[j]:dest[j] + n_j] = source[starts[j]:stops[j]]`` for every j (``n_j = stops[j] - starts[j]``)."""
    _copy_ranges(source, starts, stops, dest, out)
