"""Per-value kernels of the reader, one module per algorithm.

Each module holds everything about its algorithm side by side: the scalar reference (where one exists,
plain Python written from the published definition, slow, kept so that tests can pin the fast paths down),
the vectorised numpy path, and the numba kernel. Its public entry points choose between the kernel and the
numpy path through ``jit.enabled()``; callers never choose. Both paths give the same bits and the same
errors (tests check it), so numba only changes the speed.

Nothing here knows about files, units or batches: the stage modules (``data.decode``, ``data.layout``)
call these on arrays.
"""
