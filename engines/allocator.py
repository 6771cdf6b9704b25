"""The C allocator's side of training memory on CPU.

glibc's malloc raises its mmap threshold every time a large block is freed (up to 32 MiB), so after
the first training step the tensors of a forward/backward pass (activations, logits chunks, tens of
MiB each) come from the heap, and the heap keeps what they freed: measured on the default model, the
RSS of a fold step stayed ~1 GiB above what was live (2.1 GiB peak; `malloc_trim` gave 1.2 GiB of it
back). A fixed threshold turns that off: blocks at or above it are mmap'd and returned to the system
when freed. It is a process-wide setting, made once per process (a later call with another threshold
is refused with a warning), on glibc only; elsewhere (macOS,
musl) it does nothing. It costs time: every large block is a fresh mapping, page-faulted in again
(measured: a fold step's forward/backward at 128 KiB took 1.3-1.6x as long, docs/benchmarks.md), so
the fold leaves it off unless `FoldConfig.heap_threshold_kib` asks for it (the HF engine applies it
when it lends its weights to a trainer: `HFEngine.lend_base`).
"""

from __future__ import annotations

import logging

from engines import onednn

log = logging.getLogger(__name__)
_libc = onednn.glibc  # the C library when it has glibc's mallopt

M_TRIM_THRESHOLD = -1  # glibc mallopt parameter (malloc.h)
_applied: int | None = None  # the threshold (bytes) this process runs with, once set


def cap_heap(threshold_kib: int) -> bool:
    """Serve blocks of `threshold_kib` KiB and more by mmap (freed straight back to the system) and
    trim the heap top above that much free memory. 0 leaves the allocator as it is. True if applied."""
    global _applied
    if threshold_kib <= 0:
        return False
    if _applied is not None:
        if _applied != threshold_kib * 1024:
            log.warning("the heap threshold is already %d KiB in this process; %d KiB is not applied",
                        _applied // 1024, threshold_kib)
        return _applied == threshold_kib * 1024
    libc = _libc()
    if libc is None:
        return False
    size = threshold_kib * 1024
    applied = bool(libc.mallopt(onednn.M_MMAP_THRESHOLD, size)) and bool(libc.mallopt(M_TRIM_THRESHOLD, size))
    if applied:
        _applied = size
        onednn.heap_threshold = size  # what its weight swaps (onednn.mapped_blocks) go back to
    else:
        log.warning("mallopt refused a %d KiB threshold; the allocator is left as it is", threshold_kib)
    return applied

