"""The system libbpf (libbpf.so.1, >= 1.2) through ctypes: open, load and attach the scheduler.

bcc cannot load struct_ops programs, so libbpf does that part; bcc handles the maps and the
ring buffer afterwards (see bpfmaps.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("mlsched.libbpf")

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_vp = ctypes.c_void_p
_lib.bpf_object__open_file.restype = _vp
_lib.bpf_object__open_file.argtypes = [ctypes.c_char_p, _vp]
_lib.bpf_object__load.restype = ctypes.c_int
_lib.bpf_object__load.argtypes = [_vp]
_lib.bpf_object__close.restype = None
_lib.bpf_object__close.argtypes = [_vp]
_lib.bpf_object__find_map_by_name.restype = _vp
_lib.bpf_object__find_map_by_name.argtypes = [_vp, ctypes.c_char_p]
_lib.bpf_map__fd.restype = ctypes.c_int
_lib.bpf_map__fd.argtypes = [_vp]
_lib.bpf_map__set_max_entries.restype = ctypes.c_int
_lib.bpf_map__set_max_entries.argtypes = [_vp, ctypes.c_uint32]
_lib.bpf_map__attach_struct_ops.restype = _vp
_lib.bpf_map__attach_struct_ops.argtypes = [_vp]
_lib.bpf_link__destroy.restype = ctypes.c_int
_lib.bpf_link__destroy.argtypes = [_vp]
_lib.bpf_obj_pin.restype = ctypes.c_int
_lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
_lib.bpf_obj_get.restype = ctypes.c_int
_lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
_lib.libbpf_get_error.restype = ctypes.c_long
_lib.libbpf_get_error.argtypes = [_vp]

# libbpf_print_fn_t: int (*)(enum libbpf_print_level, const char *fmt, va_list args)
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, _vp)
_libc.vsnprintf.restype = ctypes.c_int
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, _vp]

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


class LibbpfError(Exception):
    """A libbpf call failed; str() is one line naming the step and the errno."""


def _errno_error(step: str, err: int) -> LibbpfError:
    err = abs(err)
    return LibbpfError(f"{step}: {os.strerror(err)} (errno {err})")


def set_print(verbose: bool) -> None:
    """Route libbpf's messages to logging: warnings always, debug output with verbose."""

    def _print(level: int, fmt: bytes, args: int) -> int:
        if level == LIBBPF_DEBUG and not verbose:
            return 0
        buf = ctypes.create_string_buffer(1 << 20)  # the verifier log comes as one message
        _libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip()
        if text:
            log.log(logging.WARNING if level == LIBBPF_WARN else logging.DEBUG, "%s", text)
        return 0

    global _print_cb
    _print_cb = _PRINT_FN(_print)  # keep a reference: libbpf holds the pointer
    _lib.libbpf_set_print(_print_cb)


_print_cb: object = None


def obj_pin(fd: int, path: str) -> None:
    if _lib.bpf_obj_pin(fd, path.encode()) != 0:
        raise _errno_error(f"pin {path}", ctypes.get_errno())


def obj_get(path: str) -> int:
    fd = _lib.bpf_obj_get(path.encode())
    if fd < 0:
        raise _errno_error(f"open pinned {path}", ctypes.get_errno())
    return fd


class BpfObject:
    """One opened BPF object file; close() releases it (and detaches nothing by itself)."""

    def __init__(self, path: str) -> None:
        ptr = _lib.bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise _errno_error(f"open {path}", ctypes.get_errno())
        self._obj: int | None = ptr
        self.path = path

    def _map(self, name: str) -> int:
        m = _lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise LibbpfError(f"{self.path} has no map named {name!r}")
        return m

    def set_max_entries(self, map_name: str, n: int) -> None:
        err = _lib.bpf_map__set_max_entries(self._map(map_name), n)
        if err:
            raise _errno_error(f"set max_entries of {map_name}", err)

    def load(self) -> None:
        err = _lib.bpf_object__load(self._obj)
        if err:
            raise _errno_error(f"load {self.path} (rerun with --verbose for the verifier log)", err)

    def map_fd(self, name: str) -> int:
        fd = _lib.bpf_map__fd(self._map(name))
        if fd < 0:
            raise _errno_error(f"fd of map {name}", fd)
        return fd

    def attach_struct_ops(self, map_name: str) -> StructOpsLink:
        link = _lib.bpf_map__attach_struct_ops(self._map(map_name))
        if not link:
            raise _errno_error(f"attach {map_name}", ctypes.get_errno())
        return StructOpsLink(link)

    def close(self) -> None:
        if self._obj:
            _lib.bpf_object__close(self._obj)
            self._obj = None


class StructOpsLink:
    """A .struct_ops.link attachment: the scheduler stays as long as this link (or the process)."""

    def __init__(self, ptr: int) -> None:
        self._ptr: int | None = ptr

    def destroy(self) -> None:
        if self._ptr:
            _lib.bpf_link__destroy(self._ptr)
            self._ptr = None
