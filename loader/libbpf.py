"""The system libbpf (libbpf.so.1, >= 1.2) through ctypes: open, load and attach the scheduler.

bcc cannot load struct_ops programs, so libbpf does that part; bcc handles the maps and the
ring buffer afterwards (see bpfmaps.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import mmap
import os

log = logging.getLogger("mlsched.libbpf")

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

_vp, _int, _u32, _str = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
_u32p, _sizep = ctypes.POINTER(_u32), ctypes.POINTER(ctypes.c_size_t)
for _name, _res, *_args in (
    ("bpf_object__open_file", _vp, _str, _vp), ("bpf_object__load", _int, _vp),
    ("bpf_object__close", None, _vp), ("bpf_object__btf", _vp, _vp),
    ("bpf_object__find_map_by_name", _vp, _vp, _str),
    ("bpf_object__find_program_by_name", _vp, _vp, _str), ("bpf_program__fd", _int, _vp),
    ("bpf_map__fd", _int, _vp), ("bpf_map__initial_value", _vp, _vp, _sizep),
    ("bpf_map__set_max_entries", _int, _vp, _u32), ("bpf_map__set_value_size", _int, _vp, _u32),
    ("bpf_map__attach_struct_ops", _vp, _vp), ("bpf_link__destroy", _int, _vp),
    ("bpf_obj_pin", _int, _int, _str), ("bpf_obj_get", _int, _str),
    ("bpf_obj_get_info_by_fd", _int, _int, _vp, _u32p), ("libbpf_get_error", ctypes.c_long, _vp),
    ("btf__load_vmlinux_btf", _vp), ("btf__free", None, _vp),
    ("btf__find_by_name_kind", _int, _vp, _str, _u32), ("btf__type_by_id", _vp, _vp, _u32),
    ("btf__name_by_offset", _str, _vp, _u32),
):
    getattr(_lib, _name).restype, getattr(_lib, _name).argtypes = _res, list(_args)

# libbpf_print_fn_t: int (*)(enum libbpf_print_level, const char *fmt, va_list args)
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, _vp)
_libc.vsnprintf.restype, _libc.vsnprintf.argtypes = _int, [_str, ctypes.c_size_t, _str, _vp]
LIBBPF_WARN, LIBBPF_DEBUG = 0, 2
_print_cb: object = None


class LibbpfError(Exception):
    """A libbpf call failed; str() is one line naming the step and the errno."""


def _error(step: str, err: int) -> LibbpfError:
    return LibbpfError(f"{step}: {os.strerror(err)} (errno {err})")


def _check(res: int, step: str) -> int:
    """The result of a libbpf call that returns a negative errno on failure."""
    if res < 0:
        raise _error(step, -res)
    return res


def _found(ptr: int | None, error: str) -> int:
    """The pointer a libbpf lookup returned, or LibbpfError(error) for NULL."""
    if not ptr:
        raise LibbpfError(error)
    return ptr


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


def obj_pin(fd: int, path: str) -> None:
    _check(_lib.bpf_obj_pin(fd, path.encode()), f"pin {path}")


def obj_get(path: str) -> int:
    return _check(_lib.bpf_obj_get(path.encode()), f"open pinned {path}")


def map_max_entries(fd: int) -> int:
    """max_entries of a map, from struct bpf_map_info (type, id, key_size, value_size, max_...)."""
    info = (ctypes.c_uint32 * 64)()  # zeroed; the kernel fills as much as its struct holds
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "map info")
    return info[4]


# BTF kinds (include/uapi/linux/btf.h). libbpf returns raw struct btf_type pointers (name_off,
# info, size or type: three u32s), each followed by vlen records of u32s in the kind's layout.
BTF_KIND_STRUCT, BTF_KIND_ENUM, BTF_KIND_DATASEC, BTF_KIND_ENUM64 = 4, 6, 15, 19
_BTF_TYPE_WORDS = 3


class Btf:
    """Read-only view of a libbpf struct btf (the object's, or the running kernel's), which
    its owner frees."""

    def __init__(self, ptr: int) -> None:
        self._ptr = ptr

    def _words(self, type_id: int, count: int, start: int = 0) -> list[int]:
        """count u32s of type type_id from word `start` (its struct btf_type, then records)."""
        addr = _lib.btf__type_by_id(self._ptr, type_id) + 4 * start
        return list((ctypes.c_uint32 * count).from_address(addr))

    def _records(self, name: str, kind: int, words: int) -> list[list[int]]:
        """The records (`words` u32s each) of the type of this name and kind; [] without one."""
        tid = _lib.btf__find_by_name_kind(self._ptr, name.encode(), kind)
        if tid <= 0:
            return []
        vlen = self._words(tid, 2)[1] & 0xFFFF
        flat = self._words(tid, vlen * words, _BTF_TYPE_WORDS)
        return [flat[i:i + words] for i in range(0, len(flat), words)]

    def _name(self, off: int) -> str:
        return (_lib.btf__name_by_offset(self._ptr, off) or b"").decode()

    def enum_values(self, name: str) -> dict[str, int]:
        """Members of enum `name` (32- or 64-bit); empty when the kernel has no such enum."""
        # btf_enum64: name_off, val_lo32, val_hi32; btf_enum: name_off, val (its u32 bits)
        for kind, words in ((BTF_KIND_ENUM64, 3), (BTF_KIND_ENUM, 2)):
            if records := self._records(name, kind, words):
                return {self._name(r[0]): r[1] | (r[2] << 32 if words == 3 else 0)
                        for r in records}
        return {}

    def datasec_vars(self, section: str) -> dict[str, tuple[int, int]]:
        """Variable name -> (offset, size) in a data section such as .rodata."""
        # btf_var_secinfo: type, offset, size; a var's name is its btf_type's first word
        return {self._name(self._words(var, 1)[0]): (off, size)
                for var, off, size in self._records(section, BTF_KIND_DATASEC, 3)}

    def member_offset(self, struct: str, member: str) -> int:
        """Byte offset of a struct member; -1 when the struct or member is unknown."""
        for name_off, _type, bits in self._records(struct, BTF_KIND_STRUCT, 3):  # btf_member
            if self._name(name_off) == member:
                return (bits & 0xFFFFFF) // 8
        return -1


@functools.cache
def kernel_enum_values(enum_types: tuple[str, ...]) -> dict[str, int]:
    """Members of these enums in the running kernel's BTF; read once per process (a restart
    after hotplug reuses them: parsing the kernel's BTF takes seconds under TCG)."""
    ptr = _lib.btf__load_vmlinux_btf()
    if not ptr or _lib.libbpf_get_error(ptr):
        raise LibbpfError("cannot read the kernel's BTF (/sys/kernel/btf/vmlinux)")
    try:
        kbtf = Btf(ptr)
        return {k: v for enum_type in enum_types for k, v in kbtf.enum_values(enum_type).items()}
    finally:
        _lib.btf__free(ptr)


_UINT_OF_SIZE = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}


class BpfObject:
    """One opened BPF object file, attached by attach_struct_ops() until detach(); close()
    releases the object (and detaches nothing by itself)."""

    def __init__(self, path: str) -> None:
        ptr = _lib.bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise _error(f"open {path}", ctypes.get_errno())
        self._obj: int | None = ptr
        self.path = path
        self.loaded = False
        self._links: list[int] = []
        self._mmaps: dict[str, mmap.mmap] = {}
        self._vars: dict[str, dict[str, tuple[int, int]]] = {}

    def _map(self, name: str) -> int:
        m = _lib.bpf_object__find_map_by_name(self._obj, name.encode())
        return _found(m, f"{self.path} has no map named {name!r}")

    def set_max_entries(self, map_name: str, n: int) -> None:
        _check(_lib.bpf_map__set_max_entries(self._map(map_name), n),
               f"set max_entries of {map_name}")

    def set_value_size(self, map_name: str, size: int) -> None:
        """Resize a map's value before load (a RESIZABLE_ARRAY data section)."""
        _check(_lib.bpf_map__set_value_size(self._map(map_name), size),
               f"set value size of {map_name}")

    def initial_value(self, map_name: str) -> tuple[int, int]:
        """(address, size) of a map's data before load: .rodata, or a struct_ops map's struct."""
        size = ctypes.c_size_t(0)
        addr = _lib.bpf_map__initial_value(self._map(map_name), ctypes.byref(size))
        return _found(addr, f"{self.path}: map {map_name} has no initial value"), size.value

    def btf(self) -> Btf:
        return Btf(_found(_lib.bpf_object__btf(self._obj), f"{self.path} has no BTF"))

    def view(self, map_name: str, offset: int, ctype: type) -> ctypes._CData:
        """A ctypes object over a map's initial value at offset (before load)."""
        addr, size = self.initial_value(map_name)
        if offset < 0 or offset + ctypes.sizeof(ctype) > size:
            raise LibbpfError(f"{map_name}: offset {offset} outside its {size} bytes")
        return ctype.from_address(addr + offset)

    def vars(self, section: str) -> dict[str, tuple[int, int]]:
        """A data section's variables, name -> (offset, size); its BTF walked once per object."""
        if section not in self._vars:
            self._vars[section] = self.btf().datasec_vars(section)
        return self._vars[section]

    def var(self, section: str, name: str, ctype: type | None = None) -> ctypes._CData:
        """A global variable of a data section by name, its own size's unsigned integer unless
        ctype is given: before load in the initial value; after load (.bss, .data) in the map
        itself, mmapped, where the program's stores are seen and ours reach it."""
        found = self.vars(section).get(name)
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
        _check(_lib.bpf_object__load(self._obj),
               f"load {self.path} (rerun with --verbose for the verifier log)")
        self.loaded = True

    def map_fd(self, name: str) -> int:
        return _check(_lib.bpf_map__fd(self._map(name)), f"fd of map {name}")

    def prog_fd(self, name: str) -> int:
        prog = _lib.bpf_object__find_program_by_name(self._obj, name.encode())
        return _lib.bpf_program__fd(_found(prog, f"{self.path} has no program named {name!r}"))

    def attach_struct_ops(self, map_name: str) -> None:
        """Attach a .struct_ops.link map: the scheduler stays until detach() (or exit)."""
        link = _lib.bpf_map__attach_struct_ops(self._map(map_name))
        if not link:
            raise _error(f"attach {map_name}", ctypes.get_errno())
        self._links.append(link)

    def detach(self) -> None:
        while self._links:
            _lib.bpf_link__destroy(self._links.pop())

    def close(self) -> None:
        for mm in self._mmaps.values():
            with contextlib.suppress(BufferError):  # a view still held: unmapped when freed
                mm.close()
        self._mmaps.clear()
        if self._obj:
            _lib.bpf_object__close(self._obj)
            self._obj = None
