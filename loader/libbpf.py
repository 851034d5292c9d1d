"""The system libbpf (libbpf.so.1, >= 1.2) through ctypes: open, load and attach the scheduler.

bcc cannot load struct_ops programs, so libbpf does that part; bcc handles the maps and the
ring buffer afterwards (see bpfmaps.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import mmap
import os

log = logging.getLogger("mlsched.libbpf")

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_vp, _int, _u32, _str = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
for _name, _res, *_args in (
    ("bpf_object__open_file", _vp, _str, _vp),
    ("bpf_object__load", _int, _vp),
    ("bpf_object__close", None, _vp),
    ("bpf_object__find_map_by_name", _vp, _vp, _str),
    ("bpf_map__fd", _int, _vp),
    ("bpf_map__set_max_entries", _int, _vp, _u32),
    ("bpf_map__set_value_size", _int, _vp, _u32),
    ("bpf_map__attach_struct_ops", _vp, _vp),
    ("bpf_link__destroy", _int, _vp),
    ("bpf_obj_pin", _int, _int, _str),
    ("bpf_obj_get", _int, _str),
    ("bpf_obj_get_info_by_fd", _int, _int, _vp, ctypes.POINTER(_u32)),
    ("libbpf_get_error", ctypes.c_long, _vp),
    ("bpf_object__find_program_by_name", _vp, _vp, _str),
    ("bpf_program__fd", _int, _vp),
    ("bpf_prog_test_run_opts", _int, _int, _vp),
    ("bpf_map__initial_value", _vp, _vp, ctypes.POINTER(ctypes.c_size_t)),
    ("bpf_object__btf", _vp, _vp),
    ("btf__load_vmlinux_btf", _vp),
    ("btf__free", None, _vp),
    ("btf__find_by_name_kind", _int, _vp, _str, _u32),
    ("btf__type_by_id", _vp, _vp, _u32),
    ("btf__name_by_offset", _str, _vp, _u32),
):
    getattr(_lib, _name).restype, getattr(_lib, _name).argtypes = _res, list(_args)

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


def map_max_entries(fd: int) -> int:
    """max_entries of a map, from struct bpf_map_info (type, id, key_size, value_size, max_...)."""
    info = (ctypes.c_uint32 * 64)()  # zeroed; the kernel fills as much as its struct holds
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if _lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) != 0:
        raise _errno_error("map info", ctypes.get_errno())
    return info[4]


# BTF kinds and records (include/uapi/linux/btf.h): libbpf returns raw struct btf_type
# pointers, each followed by vlen records of the kind's own layout.
BTF_KIND_STRUCT, BTF_KIND_ENUM, BTF_KIND_DATASEC, BTF_KIND_ENUM64 = 4, 6, 15, 19


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32),
                ("size_or_type", ctypes.c_uint32)]


class _Rec3(ctypes.Structure):
    """btf_member, btf_var_secinfo and btf_enum64 are all three u32s."""

    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint32), ("c", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class Btf:
    """Read-only view of a libbpf struct btf (the object's, or the running kernel's)."""

    def __init__(self, ptr: int, owned: bool) -> None:
        self._ptr = ptr
        self._owned = owned

    @classmethod
    def vmlinux(cls) -> Btf:
        ptr = _lib.btf__load_vmlinux_btf()
        if not ptr or _lib.libbpf_get_error(ptr):
            raise LibbpfError("cannot read the kernel's BTF (/sys/kernel/btf/vmlinux)")
        return cls(ptr, owned=True)

    def close(self) -> None:
        if self._owned and self._ptr:
            _lib.btf__free(self._ptr)
        self._ptr = 0

    def _records(self, type_id: int, rec: type[ctypes.Structure]) -> tuple[int, list]:
        t = _BtfType.from_address(_lib.btf__type_by_id(self._ptr, type_id))
        vlen = t.info & 0xFFFF
        base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        return t.info >> 24 & 0x1F, [rec.from_address(base + i * ctypes.sizeof(rec))
                                     for i in range(vlen)]

    def _name(self, off: int) -> str:
        return (_lib.btf__name_by_offset(self._ptr, off) or b"").decode()

    def find(self, name: str, kind: int) -> int:
        """Type id of a named type of this kind, or -1."""
        tid = _lib.btf__find_by_name_kind(self._ptr, name.encode(), kind)
        return tid if tid > 0 else -1

    def enum_values(self, name: str) -> dict[str, int]:
        """Members of enum `name` (32- or 64-bit); empty when the kernel has no such enum."""
        for kind in (BTF_KIND_ENUM64, BTF_KIND_ENUM):
            tid = self.find(name, kind)
            if tid < 0:
                continue
            if kind == BTF_KIND_ENUM:
                return {self._name(e.name_off): e.val & 0xFFFFFFFF
                        for e in self._records(tid, _BtfEnum)[1]}
            return {self._name(r.a): r.b | (r.c << 32) for r in self._records(tid, _Rec3)[1]}
        return {}

    def datasec_vars(self, section: str) -> dict[str, tuple[int, int]]:
        """Variable name -> (offset, size) in a data section such as .rodata."""
        tid = self.find(section, BTF_KIND_DATASEC)
        if tid < 0:
            return {}
        out = {}
        for r in self._records(tid, _Rec3)[1]:  # btf_var_secinfo: type, offset, size
            var = _BtfType.from_address(_lib.btf__type_by_id(self._ptr, r.a))
            out[self._name(var.name_off)] = (r.b, r.c)
        return out

    def member_offset(self, struct: str, member: str) -> int:
        """Byte offset of a struct member; -1 when the struct or member is unknown."""
        tid = self.find(struct, BTF_KIND_STRUCT)
        if tid < 0:
            return -1
        for r in self._records(tid, _Rec3)[1]:  # btf_member: name_off, type, offset (bits)
            if self._name(r.a) == member:
                return (r.c & 0xFFFFFF) // 8
        return -1


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf >= 1.0)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", _vp), ("data_out", _vp),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", _vp), ("ctx_out", _vp),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


def test_run(prog_fd: int, ctx: ctypes.Structure) -> int:
    """Run a syscall program once on ctx (the kernel writes it back in place, ctx_out must be
    unset for this program type); returns the program's return value."""
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts))
    opts.ctx_in = ctypes.addressof(ctx)
    opts.ctx_size_in = ctypes.sizeof(ctx)
    if _lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)) != 0:
        raise _errno_error("BPF_PROG_TEST_RUN", ctypes.get_errno())
    return opts.retval


_UINT_OF_SIZE = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}


class BpfObject:
    """One opened BPF object file; close() releases it (and detaches nothing by itself)."""

    def __init__(self, path: str) -> None:
        ptr = _lib.bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise _errno_error(f"open {path}", ctypes.get_errno())
        self._obj: int | None = ptr
        self.path = path
        self.loaded = False
        self._mmaps: dict[str, mmap.mmap] = {}
        self._vars: dict[str, dict[str, tuple[int, int]]] = {}

    def _map(self, name: str) -> int:
        m = _lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise LibbpfError(f"{self.path} has no map named {name!r}")
        return m

    def set_max_entries(self, map_name: str, n: int) -> None:
        err = _lib.bpf_map__set_max_entries(self._map(map_name), n)
        if err:
            raise _errno_error(f"set max_entries of {map_name}", err)

    def initial_value(self, map_name: str) -> tuple[int, int]:
        """(address, size) of a map's data before load: .rodata, or a struct_ops map's struct."""
        size = ctypes.c_size_t(0)
        addr = _lib.bpf_map__initial_value(self._map(map_name), ctypes.byref(size))
        if not addr:
            raise LibbpfError(f"{self.path}: map {map_name} has no initial value")
        return addr, size.value

    def btf(self) -> Btf:
        ptr = _lib.bpf_object__btf(self._obj)
        if not ptr:
            raise LibbpfError(f"{self.path} has no BTF")
        return Btf(ptr, owned=False)

    def set_value_size(self, map_name: str, size: int) -> None:
        """Resize a map's value before load (a RESIZABLE_ARRAY data section)."""
        err = _lib.bpf_map__set_value_size(self._map(map_name), size)
        if err:
            raise _errno_error(f"set value size of {map_name}", err)

    def view(self, map_name: str, offset: int, ctype: type) -> ctypes._CData:
        """A ctypes object over a map's initial value at offset (before load)."""
        addr, size = self.initial_value(map_name)
        if offset < 0 or offset + ctypes.sizeof(ctype) > size:
            raise LibbpfError(f"{map_name}: offset {offset} outside its {size} bytes")
        return ctype.from_address(addr + offset)

    def var(self, section: str, name: str, ctype: type | None = None) -> ctypes._CData:
        """A global variable of a data section by name, its own size's unsigned integer unless
        ctype is given: before load in the initial value; after load (.bss, .data) in the map
        itself, mmapped, where the program's stores are seen and ours reach it."""
        if section not in self._vars:  # one walk of the section's BTF per object
            self._vars[section] = self.btf().datasec_vars(section)
        found = self._vars[section].get(name)
        if found is None:
            raise LibbpfError(f"{self.path}: no variable {name!r} in {section}")
        off, size = found
        ctype = ctype or _UINT_OF_SIZE[size]
        if not self.loaded:
            return self.view(section, off, ctype)
        if section not in self._mmaps:
            length = -(-self.initial_value(section)[1] // mmap.PAGESIZE) * mmap.PAGESIZE
            self._mmaps[section] = mmap.mmap(self.map_fd(section), length, mmap.MAP_SHARED)
        return ctype.from_buffer(self._mmaps[section], off)

    def load(self) -> None:
        err = _lib.bpf_object__load(self._obj)
        if err:
            raise _errno_error(f"load {self.path} (rerun with --verbose for the verifier log)", err)
        self.loaded = True

    def map_fd(self, name: str) -> int:
        fd = _lib.bpf_map__fd(self._map(name))
        if fd < 0:
            raise _errno_error(f"fd of map {name}", fd)
        return fd

    def prog_fd(self, name: str) -> int:
        prog = _lib.bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise LibbpfError(f"{self.path} has no program named {name!r}")
        return _lib.bpf_program__fd(prog)

    def attach_struct_ops(self, map_name: str) -> StructOpsLink:
        link = _lib.bpf_map__attach_struct_ops(self._map(map_name))
        if not link:
            raise _errno_error(f"attach {map_name}", ctypes.get_errno())
        return StructOpsLink(link)

    def close(self) -> None:
        for mm in self._mmaps.values():
            with contextlib.suppress(BufferError):  # a view still held: unmapped when freed
                mm.close()
        self._mmaps.clear()
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
