"""The decision table the kernel reads: a dense grid where it fits, else a hash on demand.

On a small machine every key the scheduler can produce fits a dense grid (mlsched.h): one
byte per key in an mmapped BPF array, written with plain stores, so the whole table is
decided the moment a model is ready. Where it does not fit, decisions go to the "decisions"
hash as candidates arrive. A model reload starts a new generation: the grid is cleared and
hash entries of older generations read as misses, so the fallback serves until the new
model has decided.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

from loader import contract, schema
from loader.bpfmaps import DecisionMap

GridDims = tuple[int, int]  # (nr_cpus, dom_cpus) of the grid


def grid_dims(nr_cpus: int, max_dom_cpus: int) -> GridDims | None:
    """The grid for this machine's domains, or None when it is too large (the hash serves)."""
    fits = (max_dom_cpus <= schema.KEY_FIELD_MAX
            and schema.grid_size(nr_cpus, max_dom_cpus) <= contract.GRID_MAX_KEYS)
    return (nr_cpus, max_dom_cpus) if fits else None


def grid_words(dims: GridDims | None) -> int:
    """u64 words of the decision_grid map (at least one: BPF arrays are never empty)."""
    return 1 if dims is None else max(1, -(-schema.grid_size(*dims) // 8))


class DecisionGrid:
    """The mmapped decision_grid map: byte i is grid key i's contract.GridCode."""

    def __init__(self, fd: int, dims: GridDims) -> None:
        self.dims = dims
        self.size = schema.grid_size(*dims)
        pages = -(-grid_words(dims) * 8 // mmap.PAGESIZE)
        self._mm = mmap.mmap(fd, pages * mmap.PAGESIZE, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.codes = np.frombuffer(self._mm, dtype=np.uint8, count=self.size)

    def decided(self) -> int:
        return int(np.count_nonzero(self.codes))

    def clear(self) -> None:
        self.codes[:] = contract.GridCode.UNDECIDED

    def close(self) -> None:
        del self.codes
        self._mm.close()


class DecisionTable:
    """Where decisions go: the grid for keys it holds, the hash for the others."""

    def __init__(self, decisions: DecisionMap, grid: DecisionGrid | None,
                 model_gen: ctypes.c_uint32 | None) -> None:
        """model_gen: the kernel's generation variable, mmapped (None: no reloads)."""
        self.hash = decisions
        self.grid = grid
        self.model_gen = model_gen
        self.generation = 0
        self.hash_keys: set[int] = set()  # keys of this generation in the hash

    def write(self, keys: np.ndarray, migrate: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.uint64)
        migrate = np.asarray(migrate, dtype=bool)
        rest = np.ones(len(keys), dtype=bool)
        if self.grid is not None:
            idx = schema.grid_indices(keys, *self.grid.dims)
            rest = idx < 0
            self.grid.codes[idx[~rest]] = np.where(migrate[~rest], contract.GridCode.MIGRATE,
                                                   contract.GridCode.KEEP)
        if rest.any():
            values = (np.uint32(self.generation << contract.GEN_SHIFT)
                      | migrate[rest].astype(np.uint32))
            self.hash.update_batch(keys[rest], values)
            self.hash_keys.update(keys[rest].tolist())

    def is_decided(self, key: int) -> bool:
        if self.grid is not None:
            i = int(schema.grid_indices(key, *self.grid.dims))
            if i >= 0:
                return bool(self.grid.codes[i])
        return key in self.hash_keys

    def entries(self) -> int:
        return (self.grid.decided() if self.grid is not None else 0) + len(self.hash_keys)

    def new_generation(self) -> None:
        """Drop every decision at once: the next model starts from an empty table."""
        self.generation = (self.generation + 1) & 0xFFFFFF
        if self.model_gen is not None:
            self.model_gen.value = self.generation
        self.hash_keys.clear()
        if self.grid is not None:
            self.grid.clear()

    def close(self) -> None:
        self.model_gen = None  # its memory goes with the object
        if self.grid is not None:
            self.grid.close()
