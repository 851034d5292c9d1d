"""Map and ring-buffer access through bcc's libbcc_bpf, on map fds that libbpf created.

libbcc_bpf.so.0 is bcc's own map and ring-buffer library (Debian's libbpfcc, which python3-bpfcc
depends on): the calls bcc.libbcc makes, without the LLVM and clang that libbcc.so.0 links
(~60 MB of mappings). Nothing here compiles a bcc program (that costs seconds and needs
kernel headers): these calls work on any map fd, including maps pinned by another process.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import numpy as np

BCC_BPF_LIB = "libbcc_bpf.so.0"
bcc = ctypes.CDLL(BCC_BPF_LIB, use_errno=True)
_vp, _int, _u32p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)
# Prototypes from bcc's src/cc/libbpf.h.
for _name, _res, _args in (
    ("bpf_update_elem", _int, [_int, _vp, _vp, ctypes.c_ulonglong]),
    ("bpf_lookup_elem", _int, [_int, _vp, _vp]),
    ("bpf_update_batch", _int, [_int, _vp, _vp, _u32p]),
    ("bpf_new_ringbuf", _vp, [_int, _vp, _vp]),
    ("bpf_free_ringbuf", None, [_vp]),
    ("bpf_poll_ringbuf", _int, [_vp, _int]),
    ("bpf_consume_ringbuf", _int, [_vp]),
):
    _fn = getattr(bcc, _name)
    _fn.restype, _fn.argtypes = _res, _args
# ring_buffer_sample_fn: int (*)(void *ctx, void *data, size_t size)
_RINGBUF_CB_TYPE = ctypes.CFUNCTYPE(_int, _vp, _vp, ctypes.c_size_t)


class MapError(Exception):
    """A map operation failed; str() is one line."""


def _check(res: int, what: str) -> None:
    if res < 0:
        err = ctypes.get_errno() or -res
        raise MapError(f"{what}: {os.strerror(err)} (errno {err})")


def possible_cpus() -> int:
    """Number of possible CPUs: the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    last = 0
    for part in text.split(","):
        last = max(last, int(part.split("-")[-1]))
    return last + 1


class U64Array:
    """An ARRAY map of u64 values (counters, config)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def get(self, index: int) -> int:
        key = ctypes.c_uint32(index)
        val = ctypes.c_uint64()
        _check(bcc.bpf_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(val)), "lookup")
        return val.value

    def set(self, index: int, value: int) -> None:
        key = ctypes.c_uint32(index)
        val = ctypes.c_uint64(value)
        _check(bcc.bpf_update_elem(self.fd, ctypes.byref(key), ctypes.byref(val), 0), "update")

    def read_all(self) -> list[int]:
        return [self.get(i) for i in range(self.size)]

    def write_all(self, values: np.ndarray) -> None:
        """Write values[i] at every index i, in one batch update."""
        keys = np.arange(len(values), dtype=np.uint32)
        vals = np.ascontiguousarray(values, dtype=np.uint64)
        count = ctypes.c_uint32(len(keys))
        res = bcc.bpf_update_batch(self.fd, keys.ctypes.data_as(ctypes.c_void_p),
                                   vals.ctypes.data_as(ctypes.c_void_p), ctypes.byref(count))
        _check(res, "batch update")


class PerCpuU64Array:
    """A PERCPU_ARRAY map of u64 counters; read() sums over CPUs."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._ncpu = possible_cpus()
        self._buf = (ctypes.c_uint64 * self._ncpu)()

    def get(self, index: int) -> int:
        key = ctypes.c_uint32(index)
        _check(bcc.bpf_lookup_elem(self.fd, ctypes.byref(key), self._buf), "lookup")
        return int(sum(self._buf))

    def read_all(self) -> list[int]:
        return [self.get(i) for i in range(self.size)]


class StructArray:
    """An ARRAY map whose values are a ctypes structure."""

    def __init__(self, fd: int, size: int, value_type: type[ctypes.Structure]) -> None:
        self.fd = fd
        self.size = size
        self.value_type = value_type

    def get(self, index: int) -> ctypes.Structure:
        key = ctypes.c_uint32(index)
        val = self.value_type()
        _check(bcc.bpf_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(val)), "lookup")
        return val


def write_struct(fd: int, index: int, value: ctypes.Structure) -> None:
    """Write one ARRAY map element whose value is a C struct."""
    key = ctypes.c_uint32(index)
    _check(bcc.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0), "update")


class DecisionMap:
    """The u64 key -> u32 decision hash map, written one batch at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def update_batch(self, keys: np.ndarray, values: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        values = np.ascontiguousarray(values, dtype=np.uint32)
        count = ctypes.c_uint32(len(keys))
        if not len(keys):
            return
        res = bcc.bpf_update_batch(
            self.fd,
            keys.ctypes.data_as(ctypes.c_void_p),
            values.ctypes.data_as(ctypes.c_void_p),
            ctypes.byref(count),
        )
        _check(res, f"batch update of {len(keys)} decisions")


class RingBufferReader:
    """bcc's ring buffer manager on a raw ring buffer fd; poll() runs on_record per record."""

    def __init__(self, fd: int, on_record: Callable[[bytes], None]) -> None:
        def _cb(_ctx: int, data: int, size: int) -> int:
            on_record(ctypes.string_at(data, size))
            return 0

        self._cb = _RINGBUF_CB_TYPE(_cb)  # keep a reference: libbcc holds the pointer
        self._mgr = bcc.bpf_new_ringbuf(fd, self._cb, None)
        if not self._mgr:
            raise MapError("could not open the candidates ring buffer")

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for records; returns how many were consumed (or -errno)."""
        return bcc.bpf_poll_ringbuf(self._mgr, timeout_ms)

    def consume(self) -> int:
        """Take every record already in the ring, without waiting; returns how many."""
        return bcc.bpf_consume_ringbuf(self._mgr)

    def close(self) -> None:
        if self._mgr:
            bcc.bpf_free_ringbuf(self._mgr)
            self._mgr = None
