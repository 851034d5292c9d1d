"""Verify a TensorFlow checkpoint (variables/) without TensorFlow.

check_model_dir must refuse a damaged model before the scheduler is attached, but TensorFlow
(72 s to import under TCG) only reads the variables after attach. So this module reads
`variables.index` itself and checks every tensor's bytes against the checksum TF stored.

The index is TF's copy of the LevelDB table format (tsl/lib/io/format.cc, block.cc):
  file    = data blocks, metaindex block, index block, footer (48 bytes)
  footer  = metaindex handle, index handle (BlockHandle: varint64 offset, varint64 size),
            zero padding to 40 bytes, fixed64 magic 0xdb4775248b80fb57
  block   = entries, restart offsets (fixed32 each), restart count (fixed32),
            then a trailer: type byte (0 = raw, 1 = snappy) + fixed32 masked crc32c of
            the contents and the type byte
  entry   = varint32 shared key bytes, varint32 unshared, varint32 value size, key delta, value
The index block maps a separator key to each data block's handle; the metaindex is empty (TF
reads neither filters nor stats) and is ignored here, as TF does. BundleWriter always writes
kNoCompression (tensor_bundle.cc), so a snappy block is reported as unsupported.

Values (tensorflow/core/protobuf/tensor_bundle.proto; field numbers checked against TF 2.21's
tensor_bundle_pb2 descriptors by tests/host/test_checkpoint_index.py):
  key ""  BundleHeaderProto  num_shards = 1, endianness = 2 (0 little, 1 big), version = 3
  others  BundleEntryProto   dtype = 1, shape = 2, shard_id = 3, offset = 4, size = 5,
                             crc32c = 6 (fixed32, masked), slices = 7
A tensor lives in variables.data-<shard_id:05d>-of-<num_shards:05d> at [offset, offset+size).
Its crc32c covers those bytes, except for DT_STRING and DT_VARIANT (see _string_crc and
_variant_crc). A partitioned tensor has an entry with `slices` and no bytes of its own; each
slice has its own entry (key starting with a NUL byte) with bytes and a checksum.

Cost: crc32c in pure Python (slicing-by-8) runs at 13-18 MB/s on the dev host, so a 1 MiB
checkpoint adds 55-80 ms (expect several times that under TCG); the bundled model (4 KB)
about 1 ms, mostly parsing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loader.protowire import read_varint

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # 2 * BlockHandle::kMaxEncodedLength (2 * 10 * 2) + 8 bytes of magic
BLOCK_TRAILER_SIZE = 5
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1

HEADER_KEY = b""
OBJECT_GRAPH_KEY = b"_CHECKPOINTABLE_OBJECT_GRAPH"
DT_STRING, DT_VARIANT = 7, 21
LITTLE_ENDIAN, BIG_ENDIAN = 0, 1

_MASK_DELTA = 0xA282EAD8


class CheckpointError(ValueError):
    """The checkpoint is damaged or unreadable; str() is one line naming the problem."""


# --- crc32c (Castagnoli), as TF's tsl/lib/hash/crc32c ---------------------------------------


def _make_tables() -> list[list[int]]:
    poly = 0x82F63B78  # reflected Castagnoli polynomial
    base = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        base.append(c)
    # Slicing-by-8: table k advances a byte through k more zero bytes, so eight input bytes
    # cost one Python loop iteration instead of eight (1.7x faster than the bytewise loop).
    tables = [base]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ base[prev[n] & 0xFF] for n in range(256)])
    return tables


_TABLES = _make_tables()


def crc32c(data: bytes | memoryview, crc: int = 0) -> int:
    """crc32c of data, continuing from crc (crc32c::Extend; crc32c(b"") is 0)."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _TABLES
    c = crc ^ 0xFFFFFFFF
    mv = memoryview(data).cast("B")
    n = len(mv) - len(mv) % 8
    for lo, hi in struct.iter_unpack("<II", mv[:n]):
        lo ^= c
        c = (
            t7[lo & 0xFF]
            ^ t6[(lo >> 8) & 0xFF]
            ^ t5[(lo >> 16) & 0xFF]
            ^ t4[lo >> 24]
            ^ t3[hi & 0xFF]
            ^ t2[(hi >> 8) & 0xFF]
            ^ t1[(hi >> 16) & 0xFF]
            ^ t0[hi >> 24]
        )
    for b in mv[n:]:
        c = t0[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """crc32c::Mask: TF stores checksums rotated and offset (so a crc of crcs stays strong)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --- varints and the protobuf wire format ---------------------------------------------------


def _varint(buf: memoryview, pos: int, what: str) -> tuple[int, int]:
    return read_varint(buf, pos, CheckpointError, what)


def _fields(buf: memoryview, what: str) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message; what names it in errors."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, what)
        wire = tag & 7
        value: int | memoryview
        if wire == 0:
            value, pos = _varint(buf, pos, what)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise CheckpointError(f"truncated fixed-width field in {what}")
            value = int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        elif wire == 2:
            size, pos = _varint(buf, pos, what)
            if pos + size > len(buf):
                raise CheckpointError(f"truncated length-delimited field in {what}")
            value = buf[pos : pos + size]
            pos += size
        else:  # groups are proto2-only; TF's checkpoint protos have none
            raise CheckpointError(f"unsupported wire type {wire} in {what}")
        if tag >> 3 == 0:
            raise CheckpointError(f"field number 0 in {what}")
        yield tag >> 3, wire, value


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# --- the table ------------------------------------------------------------------------------


def _block_handle(buf: memoryview, pos: int, what: str) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos, what)
    size, pos = _varint(buf, pos, what)
    return offset, size, pos


def _read_block(table: memoryview, offset: int, size: int, what: str) -> memoryview:
    """A block's contents, after checking its trailer like tsl's ReadBlock."""
    end = offset + size + BLOCK_TRAILER_SIZE
    if end > len(table):
        raise CheckpointError(f"{what} at {offset}+{size} runs past the end of the table")
    stored = int.from_bytes(table[offset + size + 1 : end], "little")
    if crc32c(table[offset : offset + size + 1]) != unmask(stored):
        raise CheckpointError(f"{what} at offset {offset}: block checksum mismatch")
    kind = table[offset + size]
    if kind == SNAPPY_COMPRESSION:
        raise CheckpointError(
            f"{what} at offset {offset} is snappy-compressed, which this check does not read "
            "(TF writes checkpoint indexes uncompressed)"
        )
    if kind != NO_COMPRESSION:
        raise CheckpointError(f"{what} at offset {offset}: bad block type {kind}")
    return table[offset : offset + size]


def _block_entries(block: memoryview, what: str) -> Iterator[tuple[bytes, memoryview]]:
    """(key, value) of every entry of a block, undoing the key prefix compression."""
    if len(block) < 4:
        raise CheckpointError(f"{what}: block shorter than its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 * (1 + num_restarts)
    if num_restarts == 0 or limit < 0:
        raise CheckpointError(f"{what}: bad restart count {num_restarts}")
    restarts = {
        int.from_bytes(block[limit + 4 * i : limit + 4 * i + 4], "little")
        for i in range(num_restarts)
    }
    full_keys = set()  # entry offsets with a complete key (shared == 0)
    key = b""
    pos = 0
    while pos < limit:
        start = pos
        shared, pos = _varint(block, pos, what)
        unshared, pos = _varint(block, pos, what)
        value_size, pos = _varint(block, pos, what)
        if shared > len(key) or pos + unshared + value_size > limit:
            raise CheckpointError(f"{what}: bad entry at offset {start}")
        if shared == 0:
            full_keys.add(start)
        key = key[:shared] + bytes(block[pos : pos + unshared])
        pos += unshared
        yield key, block[pos : pos + value_size]
        pos += value_size
    # TF's Seek binary-searches the restart points, so each must start an entry with a
    # complete key; a bad one would make TF miss keys this linear walk finds.
    if not restarts <= full_keys:
        raise CheckpointError(f"{what}: restart point not at an entry with a full key")


def read_table(data: bytes | memoryview) -> list[tuple[bytes, memoryview]]:
    """Every (key, value) of an SSTable, in file order; CheckpointError when malformed."""
    table = memoryview(data)
    if len(table) < FOOTER_SIZE:
        raise CheckpointError(f"{len(table)} bytes, too short for a table footer")
    footer = table[-FOOTER_SIZE:]
    if int.from_bytes(footer[-8:], "little") != TABLE_MAGIC:
        raise CheckpointError("not an SSTable (bad magic number)")
    _, _, pos = _block_handle(footer, 0, "footer")  # the metaindex: unused, as in TF
    index_offset, index_size, _ = _block_handle(footer, pos, "footer")
    index = _read_block(table, index_offset, index_size, "index block")
    result: list[tuple[bytes, memoryview]] = []
    for _, handle in _block_entries(index, "index block"):
        offset, size, _ = _block_handle(handle, 0, "index block")  # TF allows trailing bytes
        block = _read_block(table, offset, size, "data block")
        for key, value in _block_entries(block, f"data block at offset {offset}"):
            if result and key <= result[-1][0]:
                # TF finds keys by binary search; out of order, it would not find them all.
                raise CheckpointError(f"data block at offset {offset}: keys out of order")
            result.append((key, value))
    return result


# --- the bundle -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleHeader:
    num_shards: int
    endianness: int  # LITTLE_ENDIAN or BIG_ENDIAN


@dataclass(frozen=True)
class BundleEntry:
    key: str  # undecodable bytes (slice keys are binary) appear as \x escapes
    dtype: int  # a tensorflow DataType enum value
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    num_slices: int  # > 0: a partitioned tensor whose bytes live in its slices' entries

    def shard_name(self, header: BundleHeader, prefix: str = "variables") -> str:
        return f"{prefix}.data-{self.shard_id:05d}-of-{header.num_shards:05d}"


def _decode_key(key: bytes) -> str:
    return key.decode("utf-8", errors="backslashreplace")


def _parse_header(value: memoryview) -> BundleHeader:
    num_shards, endianness = 0, LITTLE_ENDIAN  # proto3 defaults
    for field, wire, item in _fields(value, "the header"):
        if field in (1, 2) and wire != 0:
            raise CheckpointError("header not parseable")
        if field == 1:
            num_shards = _int64(item)  # type: ignore[arg-type]
        elif field == 2:
            endianness = item  # type: ignore[assignment]
    return BundleHeader(num_shards, endianness)


def _parse_shape(buf: memoryview, what: str) -> tuple[int, ...]:
    dims = []
    for field, wire, item in _fields(buf, what):
        if field == 2 and wire == 2:
            size = 0
            for dfield, dwire, ditem in _fields(item, what):  # type: ignore[arg-type]
                if dfield == 1 and dwire == 0:
                    size = _int64(ditem)  # type: ignore[arg-type]
            dims.append(size)
        elif field == 3 and wire == 0 and item:
            raise CheckpointError(f"{what}: stored shape has unknown rank")
    if any(d < 0 for d in dims):
        raise CheckpointError(f"{what}: stored shape has a negative dimension")
    return tuple(dims)


# (field number -> wire type) of BundleEntryProto's fields.
_ENTRY_WIRE = {1: 0, 2: 2, 3: 0, 4: 0, 5: 0, 6: 5, 7: 2}


def _parse_entry(key: bytes, value: memoryview) -> BundleEntry:
    what = f"entry {_decode_key(key)}"
    ints = {1: 0, 3: 0, 4: 0, 5: 0, 6: 0}
    shape: tuple[int, ...] = ()
    num_slices = 0
    for field, wire, item in _fields(value, what):
        expected = _ENTRY_WIRE.get(field)
        if expected is None:
            continue  # an unknown field: proto3 parsers skip it, and so does TF
        if wire != expected:
            raise CheckpointError(f"{what}: field {field} has wire type {wire}")
        if field == 2:
            shape = _parse_shape(item, what)  # type: ignore[arg-type]
        elif field == 7:
            num_slices += 1
        else:
            ints[field] = item  # type: ignore[assignment]
    offset, size = _int64(ints[4]), _int64(ints[5])
    if offset < 0 or size < 0:
        raise CheckpointError(f"{what}: negative offset or size")
    return BundleEntry(
        key=_decode_key(key),
        dtype=ints[1],
        shape=shape,
        shard_id=ints[3],
        offset=offset,
        size=size,
        crc32c=ints[6],
        num_slices=num_slices,
    )


def read_bundle(index: bytes | memoryview) -> tuple[BundleHeader, list[BundleEntry]]:
    """The header and the entries (in key order) of a variables.index file's contents."""
    records = read_table(index)
    # TF seeks to the empty key and reads it as the header: it must be the first key.
    if not records or records[0][0] != HEADER_KEY:
        raise CheckpointError("no header entry")
    header = _parse_header(records[0][1])
    if header.num_shards < 1:
        raise CheckpointError(f"header names {header.num_shards} data shards")
    return header, [_parse_entry(key, value) for key, value in records[1:]]


def _num_elements(entry: BundleEntry, what: str) -> int:
    n = 1
    for d in entry.shape:
        n *= d
    # Every string or variant element takes at least a byte: this bounds the loops below.
    if n > entry.size:
        raise CheckpointError(f"{what}: {n} elements in {entry.size} bytes")
    return n


def _string_crc(data: memoryview, entry: BundleEntry, what: str) -> tuple[int, list[bytes]]:
    """(crc, elements) of a DT_STRING tensor, as TF's ReadStringTensor computes it.

    Layout: a varint64 length per element, a fixed32 masked crc32c of those lengths, then the
    bytes of each element. TF checksums each length as a little-endian uint32 (uint64 when
    larger, for old checkpoints), not the varint bytes, then the 4 raw length-checksum bytes,
    then the string bytes.
    """
    pos, crc, lengths = 0, 0, []
    if entry.size == 0:  # TF skips reading, so the checksum is crc32c of nothing
        return 0, []
    for _ in range(_num_elements(entry, what)):
        length, pos = _varint(data, pos, what)
        lengths.append(length)
        crc = crc32c(length.to_bytes(4 if length <= 0xFFFFFFFF else 8, "little"), crc)
    if pos + 4 > len(data):
        raise CheckpointError(f"{what}: string lengths run past its {entry.size} bytes")
    raw = data[pos : pos + 4]
    if unmask(int.from_bytes(raw, "little")) != crc:
        raise CheckpointError(f"{what}: string lengths checksum mismatch")
    crc = crc32c(raw, crc)
    pos += 4
    elements = []
    for length in lengths:
        if pos + length > len(data):
            raise CheckpointError(f"{what}: strings run past its {entry.size} bytes")
        elements.append(bytes(data[pos : pos + length]))
        crc = crc32c(data[pos : pos + length], crc)
        pos += length
    return crc, elements


def _variant_crc(data: memoryview, entry: BundleEntry, what: str) -> int:
    """crc of a DT_VARIANT tensor, as TF's ReadVariantTensor computes it.

    Layout per element: varint64 length, the serialized VariantTensorDataProto, a fixed32
    masked crc32c of everything so far. TF checksums each length as a uint64 (8 bytes).
    """
    pos, crc = 0, 0
    if entry.size == 0:
        return 0
    for i in range(_num_elements(entry, what)):
        length, pos = _varint(data, pos, what)
        crc = crc32c(length.to_bytes(8, "little"), crc)
        if pos + length + 4 > len(data):
            raise CheckpointError(f"{what}: variant {i} runs past its {entry.size} bytes")
        crc = crc32c(data[pos : pos + length], crc)
        pos += length
        raw = data[pos : pos + 4]
        if unmask(int.from_bytes(raw, "little")) != crc:
            raise CheckpointError(f"{what}: checksum mismatch after variant {i}")
        crc = crc32c(raw, crc)
        pos += 4
    return crc


def _object_names(graph: bytes) -> dict[str, str]:
    """checkpoint key -> the variable's own name (e.g. dense_0/kernel), from the object graph.

    Keras 3 keys are positions (variables/2/.ATTRIBUTES/VARIABLE_VALUE), which do not tell the
    user which weight is damaged. TrackableObjectGraph: nodes = 1; TrackableObject.attributes
    = 2; SerializedTensor.full_name = 2, checkpoint_key = 3. Best effort: {} if unreadable.
    """
    names: dict[str, str] = {}
    try:
        for field, wire, node in _fields(memoryview(graph), "object graph"):
            if field != 1 or wire != 2:
                continue
            for afield, awire, attr in _fields(node, "object graph"):  # type: ignore[arg-type]
                if afield != 2 or awire != 2:
                    continue
                parts = {
                    f: bytes(v).decode("utf-8", errors="replace")  # type: ignore[arg-type]
                    for f, w, v in _fields(attr, "object graph")  # type: ignore[arg-type]
                    if f in (2, 3) and w == 2
                }
                if parts.get(2) and parts.get(3):
                    names[parts[3]] = parts[2]
    except CheckpointError:
        return {}
    return names


def verify_checkpoint(variables_dir: str | Path, prefix: str = "variables") -> None:
    """Check the index, the data shards and every tensor's checksum; CheckpointError if bad.

    Reads each data shard whole: checkpoints the loader accepts are small dense stacks.
    """
    variables_dir = Path(variables_dir)
    index_name = f"{prefix}.index"
    try:
        index = (variables_dir / index_name).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index_name} unreadable ({e.strerror})") from e
    try:
        header, entries = read_bundle(index)
    except CheckpointError as e:
        raise CheckpointError(f"{index_name}: {e}") from None
    if header.endianness != LITTLE_ENDIAN:
        # Only written on big-endian hosts; TF byte-swaps on load, and its string checksums
        # then follow the writer's byte order. Not worth guessing at for this loader.
        raise CheckpointError(f"{index_name}: big-endian checkpoint (not supported)")

    shards: list[memoryview] = []
    for shard_id in range(header.num_shards):
        name = f"{prefix}.data-{shard_id:05d}-of-{header.num_shards:05d}"
        try:
            shards.append(memoryview((variables_dir / name).read_bytes()))
        except FileNotFoundError:
            raise CheckpointError(
                f"{name} missing (the index names {header.num_shards} shards)"
            ) from None
        except OSError as e:
            raise CheckpointError(f"{name} unreadable ({e.strerror})") from e

    # The object graph first, so that a later error can name the variable.
    graph_key = OBJECT_GRAPH_KEY.decode()
    entries.sort(key=lambda e: e.key != graph_key)  # stable: the rest keep key order
    names: dict[str, str] = {}
    for entry in entries:
        if entry.num_slices:
            continue  # no bytes of its own: its slices have entries (and checksums)
        what = f"tensor {entry.key}" + (f" ({names[entry.key]})" if entry.key in names else "")
        if entry.shard_id >= header.num_shards:
            raise CheckpointError(f"{what}: shard {entry.shard_id} of {header.num_shards}")
        shard_name = entry.shard_name(header, prefix)
        shard = shards[entry.shard_id]
        if entry.offset + entry.size > len(shard):
            raise CheckpointError(
                f"{what}: bytes {entry.offset}..{entry.offset + entry.size} run past "
                f"the end of {shard_name} ({len(shard)} bytes; truncated?)"
            )
        data = shard[entry.offset : entry.offset + entry.size]
        elements: list[bytes] = []
        try:
            if entry.dtype == DT_STRING:
                crc, elements = _string_crc(data, entry, what)
            elif entry.dtype == DT_VARIANT:
                crc = _variant_crc(data, entry, what)
            else:
                crc = crc32c(data)
        except CheckpointError as e:
            raise CheckpointError(f"{e} in {shard_name}") from None
        if crc != unmask(entry.crc32c):
            raise CheckpointError(f"{what}: checksum mismatch in {shard_name}")
        if entry.key == graph_key and len(elements) == 1:
            names = _object_names(elements[0])
