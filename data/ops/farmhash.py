"""FarmHash ``Fingerprint64`` (``farmhashna::Hash64`` of Google's farmhash): scalar reference, numpy path, kernel.

``Fingerprint64`` is the stable (platform- and version-independent) 64-bit FarmHash: the function behind
TensorFlow's ``Fingerprint64`` and BigQuery's ``FARM_FINGERPRINT``, and RecIS's ``hash_type="farm"``.
All three implementations here are written from the published definition (farmhash.cc, ``farmhashna``):

* ``farm_fingerprint64(data)`` is a plain-Python scalar reference, slow, kept to pin the fast ones down;
* ``farm_fingerprint64_strings(array)`` hashes a whole Arrow string array with numpy ``uint64`` arithmetic
  (which wraps modulo 2**64 like the C code). Strings are grouped by the length class that selects the
  code path (0, 1-3, 4-7, 8-16, 17-32, 33-64, >64 bytes); each class is computed for all its strings at
  once, and the >64-byte loop advances all long strings one 64-byte block per step;
* ``farm_ids`` is the numba kernel: one loop over the Arrow buffers that hashes and buckets every string
  (``data.ops.buckets.hash_ids`` calls it); None without numba.

Byte loads are little-endian (farmhash's ``Fetch`` on the little-endian machines everyone runs).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data.ops.jit import inline, kernel
from data.ops.strings import ByteWindows, fetch32, fetch64, string_buffers

_MASK64 = (1 << 64) - 1
K0 = 0xC3A5C85C97CB3127
K1 = 0xB492B66FBE98F273
K2 = 0x9AE16A3B2F90404F
_SEED = 81  # farmhashna::Hash64's fixed seed for inputs longer than 64 bytes

# ------------------------------------------------------------------------------------- scalar reference


def _rot(v: int, shift: int) -> int:
    """Rotate right (farmhash ``Rotate``); every shift used is in 1..63."""
    return ((v >> shift) | (v << (64 - shift))) & _MASK64


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


def _fetch64(data: bytes, i: int) -> int:
    return int.from_bytes(data[i : i + 8], "little")


def _fetch32(data: bytes, i: int) -> int:
    return int.from_bytes(data[i : i + 4], "little")


def _hash_len16(u: int, v: int, mul: int) -> int:
    a = ((u ^ v) * mul) & _MASK64
    a ^= a >> 47
    b = ((v ^ a) * mul) & _MASK64
    b ^= b >> 47
    return (b * mul) & _MASK64


def _len_0_to_16(s: bytes) -> int:
    n = len(s)
    if n >= 8:
        mul = K2 + n * 2
        a = (_fetch64(s, 0) + K2) & _MASK64
        b = _fetch64(s, n - 8)
        c = (_rot(b, 37) * mul + a) & _MASK64
        d = ((_rot(a, 25) + b) * mul) & _MASK64
        return _hash_len16(c, d, mul)
    if n >= 4:
        mul = K2 + n * 2
        a = _fetch32(s, 0)
        return _hash_len16(n + (a << 3), _fetch32(s, n - 4), mul)
    if n > 0:
        y = s[0] + (s[n >> 1] << 8)
        z = n + (s[n - 1] << 2)
        return (_shift_mix(((y * K2) ^ (z * K0)) & _MASK64) * K2) & _MASK64
    return K2


def _len_17_to_32(s: bytes) -> int:
    n = len(s)
    mul = K2 + n * 2
    a = (_fetch64(s, 0) * K1) & _MASK64
    b = _fetch64(s, 8)
    c = (_fetch64(s, n - 8) * mul) & _MASK64
    d = (_fetch64(s, n - 16) * K2) & _MASK64
    return _hash_len16(
        (_rot((a + b) & _MASK64, 43) + _rot(c, 30) + d) & _MASK64, (a + _rot((b + K2) & _MASK64, 18) + c) & _MASK64, mul
    )


def _len_33_to_64(s: bytes) -> int:
    n = len(s)
    mul = K2 + n * 2
    a = (_fetch64(s, 0) * K2) & _MASK64
    b = _fetch64(s, 8)
    c = (_fetch64(s, n - 8) * mul) & _MASK64
    d = (_fetch64(s, n - 16) * K2) & _MASK64
    y = (_rot((a + b) & _MASK64, 43) + _rot(c, 30) + d) & _MASK64
    z = _hash_len16(y, (a + _rot((b + K2) & _MASK64, 18) + c) & _MASK64, mul)
    e = (_fetch64(s, 16) * mul) & _MASK64
    f = _fetch64(s, 24)
    g = ((y + _fetch64(s, n - 32)) * mul) & _MASK64
    h = ((z + _fetch64(s, n - 24)) * mul) & _MASK64
    return _hash_len16(
        (_rot((e + f) & _MASK64, 43) + _rot(g, 30) + h) & _MASK64, (e + _rot((f + a) & _MASK64, 18) + g) & _MASK64, mul
    )


def _weak_32(s: bytes, i: int, a: int, b: int) -> tuple[int, int]:
    """``WeakHashLen32WithSeeds`` over the 32 bytes at ``s[i:]``."""
    w, x, y, z = (_fetch64(s, i + 8 * k) for k in range(4))
    a = (a + w) & _MASK64
    b = _rot((b + a + z) & _MASK64, 21)
    c = a
    a = (a + x + y) & _MASK64
    b = (b + _rot(a, 44)) & _MASK64
    return (a + z) & _MASK64, (b + c) & _MASK64


def _len_over_64(s: bytes) -> int:
    n = len(s)
    m = _MASK64
    x = _SEED
    y = (_SEED * K1 + 113) & m
    z = (_shift_mix((y * K2 + 113) & m) * K2) & m
    v0 = v1 = w0 = w1 = 0
    x = (x * K2 + _fetch64(s, 0)) & m
    # The loop covers every full 64-byte block but the last; the tail step re-reads the last 64 bytes.
    for i in range(0, ((n - 1) // 64) * 64, 64):
        x = (_rot((x + y + v0 + _fetch64(s, i + 8)) & m, 37) * K1) & m
        y = (_rot((y + v1 + _fetch64(s, i + 48)) & m, 42) * K1) & m
        x ^= w1
        y = (y + v0 + _fetch64(s, i + 40)) & m
        z = (_rot((z + w0) & m, 33) * K1) & m
        v0, v1 = _weak_32(s, i, (v1 * K1) & m, (x + w0) & m)
        w0, w1 = _weak_32(s, i + 32, (z + w1) & m, (y + _fetch64(s, i + 16)) & m)
        z, x = x, z
    mul = K1 + ((z & 0xFF) << 1)
    i = n - 64
    w0 = (w0 + ((n - 1) & 63)) & m
    v0 = (v0 + w0) & m
    w0 = (w0 + v0) & m
    x = (_rot((x + y + v0 + _fetch64(s, i + 8)) & m, 37) * mul) & m
    y = (_rot((y + v1 + _fetch64(s, i + 48)) & m, 42) * mul) & m
    x ^= (w1 * 9) & m
    y = (y + v0 * 9 + _fetch64(s, i + 40)) & m
    z = (_rot((z + w0) & m, 33) * mul) & m
    v0, v1 = _weak_32(s, i, (v1 * mul) & m, (x + w0) & m)
    w0, w1 = _weak_32(s, i + 32, (z + w1) & m, (y + _fetch64(s, i + 16)) & m)
    z, x = x, z
    return _hash_len16(
        (_hash_len16(v0, w0, mul) + _shift_mix(y) * K0 + z) & m, (_hash_len16(v1, w1, mul) + x) & m, mul
    )


def farm_fingerprint64(data: bytes) -> int:
    """Scalar reference FarmHash ``Fingerprint64`` of ``data`` as an unsigned 64-bit int (slow)."""
    n = len(data)
    if n <= 16:
        return _len_0_to_16(data)
    if n <= 32:
        return _len_17_to_32(data)
    if n <= 64:
        return _len_33_to_64(data)
    return _len_over_64(data)


# ----------------------------------------------------------------------------------------------- numpy

_U = np.uint64
_K0, _K1, _K2 = _U(K0), _U(K1), _U(K2)


def _f64(d: ByteWindows, pos: np.ndarray) -> np.ndarray:
    return d.w64[pos].astype(_U, copy=False)


def _f32(d: ByteWindows, pos: np.ndarray) -> np.ndarray:
    return d.w32[pos].astype(_U)


def _vrot(v: np.ndarray, shift: int) -> np.ndarray:
    return (v >> _U(shift)) | (v << _U(64 - shift))


def _vmix(v: np.ndarray) -> np.ndarray:
    return v ^ (v >> _U(47))


def _vlen16(u: np.ndarray, v: np.ndarray, mul: np.ndarray) -> np.ndarray:
    a = _vmix((u ^ v) * mul)
    b = _vmix((v ^ a) * mul)
    return b * mul


def _v_0_to_16(d: ByteWindows, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    out = np.full(len(s), _K2, dtype=_U)  # length 0
    un = n.astype(_U)
    big = n >= 8
    if big.any():
        sb, nb = s[big], n[big]
        mul = _K2 + un[big] * _U(2)
        a = _f64(d, sb) + _K2
        b = _f64(d, sb + nb - 8)
        out[big] = _vlen16(_vrot(b, 37) * mul + a, (_vrot(a, 25) + b) * mul, mul)
    mid = (n >= 4) & (n < 8)
    if mid.any():
        sm, nm = s[mid], n[mid]
        a = _f32(d, sm)
        out[mid] = _vlen16(un[mid] + (a << _U(3)), _f32(d, sm + nm - 4), _K2 + un[mid] * _U(2))
    small = (n > 0) & (n < 4)
    if small.any():
        ss, ns = s[small], n[small]
        y = d.raw[ss].astype(_U) + (d.raw[ss + (ns >> 1)].astype(_U) << _U(8))
        z = un[small] + (d.raw[ss + ns - 1].astype(_U) << _U(2))
        out[small] = _vmix((y * _K2) ^ (z * _K0)) * _K2
    return out


def _v_17_to_32(d: ByteWindows, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    mul = _K2 + n.astype(_U) * _U(2)
    a = _f64(d, s) * _K1
    b = _f64(d, s + 8)
    c = _f64(d, s + n - 8) * mul
    e = _f64(d, s + n - 16) * _K2
    return _vlen16(_vrot(a + b, 43) + _vrot(c, 30) + e, a + _vrot(b + _K2, 18) + c, mul)


def _v_33_to_64(d: ByteWindows, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    mul = _K2 + n.astype(_U) * _U(2)
    a = _f64(d, s) * _K2
    b = _f64(d, s + 8)
    c = _f64(d, s + n - 8) * mul
    dd = _f64(d, s + n - 16) * _K2
    y = _vrot(a + b, 43) + _vrot(c, 30) + dd
    z = _vlen16(y, a + _vrot(b + _K2, 18) + c, mul)
    e = _f64(d, s + 16) * mul
    f = _f64(d, s + 24)
    g = (y + _f64(d, s + n - 32)) * mul
    h = (z + _f64(d, s + n - 24)) * mul
    return _vlen16(_vrot(e + f, 43) + _vrot(g, 30) + h, e + _vrot(f + a, 18) + g, mul)


def _vweak32(d: ByteWindows, p: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w, x, y, z = (_f64(d, p + 8 * k) for k in range(4))
    a = a + w
    b = _vrot(b + a + z, 21)
    c = a
    a = a + x + y
    b = b + _vrot(a, 44)
    return a + z, b + c


def _v_over_64(d: ByteWindows, s: np.ndarray, n: np.ndarray) -> np.ndarray:
    count = len(s)
    x = np.full(count, _U(_SEED), dtype=_U)
    y = np.full(count, _U((_SEED * K1 + 113) & _MASK64), dtype=_U)
    z = np.full(count, _U((_shift_mix((int(y[0]) * K2 + 113) & _MASK64) * K2) & _MASK64), dtype=_U)
    v0, v1, w0, w1 = (np.zeros(count, dtype=_U) for _ in range(4))
    x = x * _K2 + _f64(d, s)
    blocks = (n - 1) // 64
    for block in range(int(blocks.max())):
        act = blocks > block  # strings that still have a full block before their last 64 bytes
        p = s[act] + 64 * block
        xa, ya, za = x[act], y[act], z[act]
        v0a, v1a, w0a, w1a = v0[act], v1[act], w0[act], w1[act]
        xa = _vrot(xa + ya + v0a + _f64(d, p + 8), 37) * _K1
        ya = _vrot(ya + v1a + _f64(d, p + 48), 42) * _K1
        xa ^= w1a
        ya = ya + v0a + _f64(d, p + 40)
        za = _vrot(za + w0a, 33) * _K1
        v0[act], v1[act] = _vweak32(d, p, v1a * _K1, xa + w0a)
        w0[act], w1[act] = _vweak32(d, p + 32, za + w1a, ya + _f64(d, p + 16))
        x[act], y[act], z[act] = za, ya, xa  # the swap of z and x
    mul = _K1 + ((z & _U(0xFF)) << _U(1))
    p = s + n - 64
    w0 = w0 + ((n - 1) & 63).astype(_U)
    v0 = v0 + w0
    w0 = w0 + v0
    x = _vrot(x + y + v0 + _f64(d, p + 8), 37) * mul
    y = _vrot(y + v1 + _f64(d, p + 48), 42) * mul
    x ^= w1 * _U(9)
    y = y + v0 * _U(9) + _f64(d, p + 40)
    z = _vrot(z + w0, 33) * mul
    v0, v1 = _vweak32(d, p, v1 * mul, x + w0)
    w0, w1 = _vweak32(d, p + 32, z + w1, y + _f64(d, p + 16))
    x, z = z, x
    return _vlen16(_vlen16(v0, w0, mul) + _vmix(y) * _K0 + z, _vlen16(v1, w1, mul) + x, mul)


_CLASSES = ((0, 16, _v_0_to_16), (17, 32, _v_17_to_32), (33, 64, _v_33_to_64))


def farm_fingerprint64_strings(strings: pa.Array) -> np.ndarray:
    """FarmHash ``Fingerprint64`` of every string of a (non-null) string/large_string array, as ``uint64``."""
    if strings.null_count:
        raise ValueError("cannot hash null strings")
    out = np.zeros(len(strings), dtype=_U)
    if len(strings) == 0:
        return out
    starts, lengths, data = string_buffers(strings)
    windows = ByteWindows(data)
    with np.errstate(over="ignore"):
        for low, high, fn in _CLASSES:
            sel = (lengths >= low) & (lengths <= high)
            if sel.any():
                out[sel] = fn(windows, starts[sel], lengths[sel])
        sel = lengths > 64
        if sel.any():
            out[sel] = _v_over_64(windows, starts[sel], lengths[sel])
    return out


# ---------------------------------------------------------------------------------------------- kernel
# The same code paths as the scalar reference, in uint64 arithmetic (every constant a uint64: numba
# promotes uint64 mixed with a signed int to float64). Helpers are inlined into ``farm_ids``.

_Z = _U(0)
_ONE = _U(1)
_TWO = _U(2)
_NINE = _U(9)
_FF = _U(0xFF)
_R47 = _U(47)
_SEED_X = _U(_SEED)
_SEED_Y = _U((_SEED * K1 + 113) & _MASK64)


@inline
def _nb_rot(v, shift):
    return (v >> _U(shift)) | (v << _U(64 - shift))


@inline
def _nb_mix(v):
    return v ^ (v >> _R47)


@inline
def _nb_len16(u, v, mul):
    a = _nb_mix((u ^ v) * mul)
    b = _nb_mix((v ^ a) * mul)
    return b * mul


@inline
def _nb_0_to_16(data, s, n):
    un = _U(n)
    if n >= 8:
        mul = _K2 + un * _TWO
        a = fetch64(data, s) + _K2
        b = fetch64(data, s + n - 8)
        return _nb_len16(_nb_rot(b, 37) * mul + a, (_nb_rot(a, 25) + b) * mul, mul)
    if n >= 4:
        a = fetch32(data, s)
        return _nb_len16(un + (a << _U(3)), fetch32(data, s + n - 4), _K2 + un * _TWO)
    if n > 0:
        y = _U(data[s]) + (_U(data[s + (n >> 1)]) << _U(8))
        z = un + (_U(data[s + n - 1]) << _TWO)
        return _nb_mix((y * _K2) ^ (z * _K0)) * _K2
    return _K2


@inline
def _nb_17_to_32(data, s, n):
    mul = _K2 + _U(n) * _TWO
    a = fetch64(data, s) * _K1
    b = fetch64(data, s + 8)
    c = fetch64(data, s + n - 8) * mul
    d = fetch64(data, s + n - 16) * _K2
    return _nb_len16(_nb_rot(a + b, 43) + _nb_rot(c, 30) + d, a + _nb_rot(b + _K2, 18) + c, mul)


@inline
def _nb_33_to_64(data, s, n):
    mul = _K2 + _U(n) * _TWO
    a = fetch64(data, s) * _K2
    b = fetch64(data, s + 8)
    c = fetch64(data, s + n - 8) * mul
    d = fetch64(data, s + n - 16) * _K2
    y = _nb_rot(a + b, 43) + _nb_rot(c, 30) + d
    z = _nb_len16(y, a + _nb_rot(b + _K2, 18) + c, mul)
    e = fetch64(data, s + 16) * mul
    f = fetch64(data, s + 24)
    g = (y + fetch64(data, s + n - 32)) * mul
    h = (z + fetch64(data, s + n - 24)) * mul
    return _nb_len16(_nb_rot(e + f, 43) + _nb_rot(g, 30) + h, e + _nb_rot(f + a, 18) + g, mul)


@inline
def _nb_weak32(data, p, a, b):
    """``WeakHashLen32WithSeeds`` over the 32 bytes at ``p``: the new (a, b) pair."""
    w = fetch64(data, p)
    x = fetch64(data, p + 8)
    y = fetch64(data, p + 16)
    z = fetch64(data, p + 24)
    a += w
    b = _nb_rot(b + a + z, 21)
    c = a
    a += x + y
    b += _nb_rot(a, 44)
    return a + z, b + c


@inline
def _nb_over_64(data, s, n):
    x = _SEED_X
    y = _SEED_Y
    z = _nb_mix(y * _K2 + _U(113)) * _K2
    v0 = _Z
    v1 = _Z
    w0 = _Z
    w1 = _Z
    x = x * _K2 + fetch64(data, s)
    # Every full 64-byte block but the last; the tail step re-reads the string's last 64 bytes.
    p = s
    end = s + ((n - 1) // 64) * 64
    while p < end:
        x = _nb_rot(x + y + v0 + fetch64(data, p + 8), 37) * _K1
        y = _nb_rot(y + v1 + fetch64(data, p + 48), 42) * _K1
        x ^= w1
        y += v0 + fetch64(data, p + 40)
        z = _nb_rot(z + w0, 33) * _K1
        v0, v1 = _nb_weak32(data, p, v1 * _K1, x + w0)
        w0, w1 = _nb_weak32(data, p + 32, z + w1, y + fetch64(data, p + 16))
        z, x = x, z
        p += 64
    mul = _K1 + ((z & _FF) << _ONE)
    p = s + n - 64
    w0 += _U((n - 1) & 63)
    v0 += w0
    w0 += v0
    x = _nb_rot(x + y + v0 + fetch64(data, p + 8), 37) * mul
    y = _nb_rot(y + v1 + fetch64(data, p + 48), 42) * mul
    x ^= w1 * _NINE
    y += v0 * _NINE + fetch64(data, p + 40)
    z = _nb_rot(z + w0, 33) * mul
    v0, v1 = _nb_weak32(data, p, v1 * mul, x + w0)
    w0, w1 = _nb_weak32(data, p + 32, z + w1, y + fetch64(data, p + 16))
    z, x = x, z
    return _nb_len16(_nb_len16(v0, w0, mul) + _nb_mix(y) * _K0 + z, _nb_len16(v1, w1, mul) + x, mul)


@inline
def _nb_farm(data, s, n):
    if n <= 16:
        return _nb_0_to_16(data, s, n)
    if n <= 32:
        return _nb_17_to_32(data, s, n)
    if n <= 64:
        return _nb_33_to_64(data, s, n)
    return _nb_over_64(data, s, n)


@kernel
def farm_ids(data, offsets, operand, modulo, out):
    """``out[i]``: the fingerprint of string i (``data[offsets[i]:offsets[i + 1]]``), then ``% operand``
    with ``modulo``, else ``& operand`` (a uint64)."""
    for i in range(len(out)):
        h = _nb_farm(data, offsets[i], offsets[i + 1] - offsets[i])
        out[i] = np.int64(h % operand) if modulo else np.int64(h & operand)
