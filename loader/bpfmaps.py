"""Map and ring-buffer access through bcc's libbcc_bpf, on map fds that libbpf created.

libbcc_bpf.so.0 is bcc's own map and ring-buffer library (Debian's libbpfcc, which python3-bpfcc
depends on): the calls bcc.libbcc makes, without the LLVM and clang that libbcc.so.0 links
(~60 MB of mappings). Nothing here compiles a bcc program (that costs seconds and needs
kernel headers): these calls work on any map fd, including maps pinned by another process.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable

import numpy as np

from loader.domains import parse_cpu_list

BCC_BPF_LIB = "libbcc_bpf.so.0"
bcc = ctypes.CDLL(BCC_BPF_LIB, use_errno=True)
_vp, _int, _u32p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)
# Prototypes from bcc's src/cc/libbpf.h.
for _name, _res, _args in (
    ("bpf_update_elem", _int, [_int, _vp, _vp, ctypes.c_ulonglong]),
    ("bpf_lookup_elem", _int, [_int, _vp, _vp]),
    ("bpf_update_batch", _int, [_int, _vp, _vp, _u32p]),
    ("bpf_new_ringbuf", _vp, [_int, _vp, _vp]), ("bpf_free_ringbuf", None, [_vp]),
    ("bpf_poll_ringbuf", _int, [_vp, _int]), ("bpf_consume_ringbuf", _int, [_vp]),
):
    getattr(bcc, _name).restype, getattr(bcc, _name).argtypes = _res, _args
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
        return max(parse_cpu_list(f.read())) + 1


def write_elem(fd: int, index: int, value: ctypes._CData) -> None:
    """Write one ARRAY map element, a ctypes value of the map's value size."""
    key = ctypes.c_uint32(index)
    _check(bcc.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0), "update")


def _update_batch(fd: int, keys: np.ndarray, values: np.ndarray, what: str) -> None:
    """One batch update of contiguous arrays of keys and values."""
    count = ctypes.c_uint32(len(keys))
    _check(bcc.bpf_update_batch(fd, keys.ctypes.data_as(_vp), values.ctypes.data_as(_vp),
                                ctypes.byref(count)), what)


class StructArray:
    """An ARRAY map whose values are value_type, a ctypes type (a structure, say)."""

    def __init__(self, fd: int, size: int, value_type: type) -> None:
        self.fd = fd
        self.size = size
        self.value_type = value_type

    def get(self, index: int) -> ctypes._CData:
        key = ctypes.c_uint32(index)
        val = self.value_type()
        _check(bcc.bpf_lookup_elem(self.fd, ctypes.byref(key), ctypes.byref(val)), "lookup")
        return val

    def read_all(self) -> list:
        return [self.get(i) for i in range(self.size)]


class U64Array(StructArray):
    """An ARRAY map of u64 values (counters, config)."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size, ctypes.c_uint64)

    def get(self, index: int) -> int:
        return super().get(index).value

    def set(self, index: int, value: int) -> None:
        write_elem(self.fd, index, ctypes.c_uint64(value))

    def write_all(self, values: np.ndarray) -> None:
        """Write values[i] at every index i, in one batch update."""
        self.write_at(range(len(values)), values)

    def write_at(self, indices: Iterable[int], values: Iterable[int]) -> None:
        """Write each value at its index, in one batch update."""
        _update_batch(self.fd, np.fromiter(indices, dtype=np.uint32),
                      np.fromiter(values, dtype=np.uint64), "batch update")


class PerCpuU64Array(StructArray):
    """A PERCPU_ARRAY map of u64 counters; get() sums over CPUs."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size, ctypes.c_uint64 * possible_cpus())

    def get(self, index: int) -> int:
        return int(sum(super().get(index)))


class DecisionMap:
    """The u64 key -> u32 decision hash map, written one batch at a time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def update_batch(self, keys: np.ndarray, values: np.ndarray) -> None:
        if len(keys):
            _update_batch(self.fd, np.ascontiguousarray(keys, dtype=np.uint64),
                          np.ascontiguousarray(values, dtype=np.uint32),
                          f"batch update of {len(keys)} decisions")


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
