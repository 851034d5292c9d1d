"""loader/checkpoint_index.py against TensorFlow's own checkpoint writer and reader.

Real checkpoints written by TF (Keras export, tf.Module, raw SaveV2 with slices, strings,
variants and two shards); TF's reader is the reference for what parses and what is corrupt.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loader import checkpoint_index as ci
from loader import contract
from loader.checkpoint_index import CheckpointError, read_bundle, read_table, verify_checkpoint
from loader.model_check import ModelError, check_model_dir
from tests.host.conftest import _copy, _module_model

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "model_dir" / "model_path"
DATA = "variables.data-00000-of-00001"


def _bundle(path: Path) -> tuple[ci.BundleHeader, list[ci.BundleEntry]]:
    return read_bundle((path / "variables" / "variables.index").read_bytes())


def _refused(path: Path, pattern: str) -> str:
    with pytest.raises(ModelError) as exc:
        check_model_dir(path)
    message = str(exc.value)
    assert "\n" not in message
    prefix = f"corrupt variables at {path}/variables: "
    assert message.startswith(prefix) and message.endswith(" (re-export the model)"), message
    assert re.search(pattern, message), message
    return message


@pytest.fixture(scope="session")
def module_model(tf, models) -> Path:
    """A contract-conforming model written by tf.Module + tf.saved_model.save (not Keras)."""
    return _module_model(tf, models / "module", contract.NR_FEATURES, tf.float32)


@pytest.fixture(scope="session")
def raw(tf, models) -> Path:
    """A checkpoint with what Keras exports lack: a partitioned tensor (slice entries), string,
    empty, int64, bfloat16 and variant tensors, and two data shards (MergeV2Checkpoints)."""
    root = models / "raw"
    for sub in ("a", "b", "variables"):
        (root / sub).mkdir(parents=True)  # SaveV2 does not create its directory
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    strings = tf.constant([[b"", b"abc"], [b"\xff" * 300, b"z"]])  # a 2-byte varint length
    tf.raw_ops.SaveV2(
        prefix=str(root / "a" / "variables"),
        tensor_names=["x", "x", "s", "empty", "i64"],
        shape_and_slices=["4 2 0,2:-", "4 2 2,2:-", "", "", ""],
        tensors=[x[:2], x[2:], strings, tf.zeros([0, 3]), tf.constant([1, -2], tf.int64)],
    )
    tensor_list = tf.raw_ops.TensorListFromTensor(
        tensor=tf.constant([[1.0, 2.0], [3.0, 4.0]]), element_shape=tf.constant([2])
    )
    tf.raw_ops.SaveV2(
        prefix=str(root / "b" / "variables"),
        tensor_names=["tl", "bf"],
        shape_and_slices=["", ""],
        tensors=[tensor_list, tf.constant([1.5], tf.bfloat16)],
    )
    tf.raw_ops.MergeV2Checkpoints(
        checkpoint_prefixes=[str(root / "a" / "variables"), str(root / "b" / "variables")],
        destination_prefix=str(root / "variables" / "variables"),
    )
    return root


@pytest.fixture(scope="session")
def many(tf, models) -> Path:
    """An index larger than TF's 256 KiB table block size: several data blocks."""
    root = models / "many"
    (root / "variables").mkdir(parents=True)
    names = [
        f"a_fairly_long_layer_name_{i:05d}/kernel/.ATTRIBUTES/VARIABLE_VALUE" for i in range(6000)
    ]
    values = tf.unstack(tf.range(len(names), dtype=tf.float32))
    tf.raw_ops.SaveV2(
        prefix=str(root / "variables" / "variables"),
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=values,
    )
    return root


ALL = ["bundled", "dummy", "tanh_stack", "module_model", "width5", "raw", "many"]


def _path(request, model: str) -> Path:
    return BUNDLED if model == "bundled" else request.getfixturevalue(model)


# --- the format against TF's descriptors and reader -----------------------------------------


def test_field_numbers_match_tf_descriptors():
    from google.protobuf.descriptor import FieldDescriptor as F
    from tensorflow.core.protobuf import tensor_bundle_pb2, trackable_object_graph_pb2

    wire = {
        F.TYPE_ENUM: 0,
        F.TYPE_INT32: 0,
        F.TYPE_INT64: 0,
        F.TYPE_BOOL: 0,
        F.TYPE_MESSAGE: 2,
        F.TYPE_STRING: 2,
        F.TYPE_FIXED32: 5,
    }

    def fields(message) -> dict[str, tuple[int, int]]:
        """name -> (field number, wire type) from TF's compiled descriptor."""
        return {f.name: (f.number, wire[f.type]) for f in message.DESCRIPTOR.fields}

    entry = fields(tensor_bundle_pb2.BundleEntryProto)
    assert entry == {
        "dtype": (1, 0),
        "shape": (2, 2),
        "shard_id": (3, 0),
        "offset": (4, 0),
        "size": (5, 0),
        "crc32c": (6, 5),
        "slices": (7, 2),
    }
    assert {n: w for n, w in entry.values()} == ci._ENTRY_WIRE
    header = fields(tensor_bundle_pb2.BundleHeaderProto)
    assert header == {"num_shards": (1, 0), "endianness": (2, 0), "version": (3, 2)}
    endianness = tensor_bundle_pb2.BundleHeaderProto.Endianness
    assert (endianness.Value("LITTLE"), endianness.Value("BIG")) == (
        ci.LITTLE_ENDIAN,
        ci.BIG_ENDIAN,
    )
    graph = trackable_object_graph_pb2.TrackableObjectGraph
    assert fields(graph)["nodes"] == (1, 2)
    assert fields(graph.TrackableObject)["attributes"] == (2, 2)
    tensor = fields(graph.TrackableObject.SerializedTensor)
    assert (tensor["full_name"], tensor["checkpoint_key"]) == ((2, 2), (3, 2))


@pytest.mark.parametrize("model", ALL)
def test_entries_agree_with_tf(request, tf, model):
    """Every (key, dtype, shape, shard, offset, size, crc) as TF's reader and protobuf see it."""
    from tensorflow.core.protobuf import tensor_bundle_pb2

    path = _path(request, model)
    index = (path / "variables" / "variables.index").read_bytes()
    header, entries = read_bundle(index)

    # Field by field, against TF's own parse of each raw value.
    records = read_table(index)
    assert records[0][0] == b""
    tf_header = tensor_bundle_pb2.BundleHeaderProto.FromString(bytes(records[0][1]))
    assert (header.num_shards, header.endianness) == (tf_header.num_shards, tf_header.endianness)
    assert len(entries) == len(records) - 1
    for entry, (key, value) in zip(entries, records[1:], strict=True):
        proto = tensor_bundle_pb2.BundleEntryProto.FromString(bytes(value))
        assert entry.key == key.decode("utf-8", errors="backslashreplace")
        assert (
            entry.dtype,
            entry.shape,
            entry.shard_id,
            entry.offset,
            entry.size,
            entry.crc32c,
            entry.num_slices,
        ) == (
            proto.dtype,
            tuple(d.size for d in proto.shape.dim),
            proto.shard_id,
            proto.offset,
            proto.size,
            proto.crc32c,
            len(proto.slices),
        )

    # The tensors TF's reader lists (slice entries, keyed "\0...", are parts of one).
    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    full = [e for e in entries if not e.key.startswith("\0")]
    assert {e.key: list(e.shape) for e in full} == reader.get_variable_to_shape_map()
    assert {e.key: e.dtype for e in full} == {
        k: v.as_datatype_enum for k, v in reader.get_variable_to_dtype_map().items()
    }
    if model in ("dummy", "tanh_stack", "bundled"):  # Keras 3 keys are positions, not names
        assert "variables/0/.ATTRIBUTES/VARIABLE_VALUE" in reader.get_variable_to_shape_map()
    verify_checkpoint(path / "variables")


def test_raw_checkpoint_has_what_keras_lacks(raw, tf):
    header, entries = _bundle(raw)
    assert header.num_shards == 2
    by_key = {e.key: e for e in entries}
    assert by_key["x"].num_slices == 2 and by_key["x"].size == 0
    assert sum(e.key.startswith("\0x") for e in entries) == 2
    assert {by_key["tl"].dtype, by_key["s"].dtype} == {ci.DT_VARIANT, ci.DT_STRING}
    assert by_key["empty"].size == 0 and by_key["tl"].shard_id == 1
    # TF restores every one of them, so their checksums are right by TF's reckoning too.
    prefix = str(raw / "variables" / "variables")
    for key, dtype in [("tl", tf.variant), ("s", tf.string), ("x", tf.float32)]:
        tf.raw_ops.RestoreV2(
            prefix=prefix, tensor_names=[key], shape_and_slices=[""], dtypes=[dtype]
        )


def test_many_blocks(many):
    """The index spans several data blocks with many restart points; TF never compresses."""
    table = memoryview((many / "variables" / "variables.index").read_bytes())
    footer = table[-ci.FOOTER_SIZE :]
    _, _, pos = ci._block_handle(footer, 0, "footer")
    offset, size, _ = ci._block_handle(footer, pos, "footer")
    handles = list(ci._block_entries(ci._read_block(table, offset, size, "index"), "index"))
    assert len(handles) >= 2
    header, entries = read_bundle(table)
    assert len(entries) == 6000


@pytest.mark.parametrize("model", ALL)
def test_tf_writes_uncompressed_blocks(request, model):
    """BundleWriter sets kNoCompression: every block's type byte is 0, none is snappy (1)."""
    table = (_path(request, model) / "variables" / "variables.index").read_bytes()
    mv = memoryview(table)
    footer = mv[-ci.FOOTER_SIZE :]
    _, _, pos = ci._block_handle(footer, 0, "footer")
    offset, size, _ = ci._block_handle(footer, pos, "footer")
    assert table[offset + size] == ci.NO_COMPRESSION
    for _, handle in ci._block_entries(mv[offset : offset + size], "index"):
        block_offset, block_size, _ = ci._block_handle(handle, 0, "index")
        assert table[block_offset + block_size] == ci.NO_COMPRESSION


def test_crc32c_known_values():
    # The standard check value and the vectors of RFC 3720 B.4 (iSCSI), as in tsl's tests.
    assert ci.crc32c(b"123456789") == 0xE3069283
    assert ci.crc32c(bytes(32)) == 0x8A9136AA
    assert ci.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert ci.crc32c(bytes(range(32))) == 0x46DD794E
    assert ci.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert ci.crc32c(b"") == 0
    data = bytes(range(256)) * 5 + b"tail"
    assert ci.crc32c(data[700:], ci.crc32c(data[:700])) == ci.crc32c(data)  # Extend
    assert ci.mask(0) == 0xA282EAD8  # what TF stores for an empty tensor (see "raw")
    for crc in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert ci.unmask(ci.mask(crc)) == crc
        assert ci.mask(crc) == ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


# --- models that pass -----------------------------------------------------------------------


def test_bundled_and_keras_and_module_models_pass(dummy, tanh_stack, module_model):
    for path in (BUNDLED, dummy, tanh_stack, module_model):
        check_model_dir(path)


# --- damaged checkpoints --------------------------------------------------------------------


def _flip(file: Path, pos: int) -> None:
    data = bytearray(file.read_bytes())
    data[pos] ^= 0x01
    file.write_bytes(bytes(data))


def _object_names(tf, path: Path) -> dict[str, str]:
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
    graph = trackable_object_graph_pb2.TrackableObjectGraph.FromString(
        reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    )
    return {a.checkpoint_key: a.full_name for node in graph.nodes for a in node.attributes}


def test_flipped_tensor_byte_names_the_variable(tmp_path, tf, dummy):
    """One flipped bit in each tensor in turn: refused, naming it; TF's reader agrees."""
    _, entries = _bundle(dummy)
    names = _object_names(tf, dummy)
    assert names["variables/0/.ATTRIBUTES/VARIABLE_VALUE"] == "dense_0/kernel"
    for i, entry in enumerate(entries):
        path = _copy(dummy, tmp_path / str(i))
        _flip(path / "variables" / DATA, entry.offset + entry.size // 2)
        label = re.escape(entry.key) + (
            f" \\({re.escape(names[entry.key])}\\)" if entry.key in names else ""
        )
        _refused(
            path,
            rf"^corrupt variables at .*: tensor {label}: checksum mismatch "
            rf"in {DATA} \(re-export the model\)$",
        )
        reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
        with pytest.raises(tf.errors.OpError, match="Checksum does not match"):
            reader.get_tensor(entry.key)


@pytest.mark.parametrize("key", ["s", "tl", "\0x", "bf", "i64"])
def test_flipped_bytes_in_raw_checkpoint(tmp_path, tf, raw, key):
    """Strings (lengths, length checksum, bytes), variants, slices, other shards."""
    header, entries = _bundle(raw)
    entry = next(e for e in entries if e.key.startswith(key) and e.size)
    tf_name = "x" if key.startswith("\0") else key  # TF reads a partitioned one whole
    first, last = entry.offset, entry.offset + entry.size - 1
    for pos in sorted({first, min(first + 4, last), (first + last) // 2, last}):
        path = _copy(raw, tmp_path / str(pos))
        _flip(path / "variables" / entry.shard_name(header), pos)
        with pytest.raises(CheckpointError, match=rf"^tensor {re.escape(entry.key)}: ") as exc:
            verify_checkpoint(path / "variables")
        assert "\n" not in str(exc.value)
        with pytest.raises(tf.errors.OpError):
            tf.raw_ops.RestoreV2(
                prefix=str(path / "variables" / "variables"),
                tensor_names=[tf_name],
                shape_and_slices=[""],
                dtypes=[tf.dtypes.as_dtype(entry.dtype)],
            )


@pytest.mark.parametrize("keep", [0, 100, 2000, -1], ids=["empty", "100", "2000", "minus1"])
def test_truncated_data_file(tmp_path, dummy, keep):
    path = _copy(dummy, tmp_path / "m")
    data = path / "variables" / DATA
    data.write_bytes(data.read_bytes()[:keep])
    _refused(
        path,
        rf": tensor \S+( \(\S+\))?: bytes \d+\.\.\d+ run past the end of {DATA} "
        rf"\(\d+ bytes; truncated\?\) \(re-export",
    )


def test_missing_shard(tmp_path, raw):
    path = _copy(raw, tmp_path / "m")
    (path / "variables" / "variables.data-00001-of-00002").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"^variables.data-00001-of-00002 missing "
        r"\(the index names 2 shards\)$",
    ):
        verify_checkpoint(path / "variables")


@pytest.mark.parametrize(
    "damage",
    ["garbage", "empty", "truncated", "flipped-entry", "flipped-footer"],
)
def test_damaged_index(tmp_path, dummy, damage):
    path = _copy(dummy, tmp_path / "m")
    index = path / "variables" / "variables.index"
    data = index.read_bytes()
    if damage == "garbage":
        index.write_bytes(b"this is not an index \xff" * 10)
        pattern = r"variables\.index: not an SSTable \(bad magic number\)"
    elif damage == "empty":
        index.write_bytes(b"")
        pattern = r"variables\.index: 0 bytes, too short for a table footer"
    elif damage == "truncated":
        index.write_bytes(data[: len(data) // 2])
        pattern = r"variables\.index: not an SSTable"
    elif damage == "flipped-entry":
        _flip(index, 100)  # inside the first (and only) data block
        pattern = r"variables\.index: data block at offset 0: block checksum mismatch"
    else:  # byte 3: the index block's offset (bytes 0-2 are the unused metaindex handle)
        _flip(index, len(data) - ci.FOOTER_SIZE + 3)
        pattern = r"variables\.index: index block at offset \d+: block checksum mismatch"
    _refused(path, pattern)


def test_snappy_block_is_unsupported(tmp_path, dummy):
    """A block marked snappy (with a valid checksum) is reported, not guessed at."""
    path = _copy(dummy, tmp_path / "m")
    index = path / "variables" / "variables.index"
    table = bytearray(index.read_bytes())
    footer = memoryview(bytes(table[-ci.FOOTER_SIZE :]))
    _, _, pos = ci._block_handle(footer, 0, "footer")
    offset, size, _ = ci._block_handle(footer, pos, "footer")
    table[offset + size] = ci.SNAPPY_COMPRESSION
    crc = ci.mask(ci.crc32c(bytes(table[offset : offset + size + 1])))
    table[offset + size + 1 : offset + size + 5] = crc.to_bytes(4, "little")
    index.write_bytes(bytes(table))
    _refused(
        path,
        r"variables\.index: index block at offset \d+ is snappy-compressed, which "
        r"this check does not read",
    )


def test_loader_refuses_corrupt_model(tmp_path):
    """The CLI refuses before attach: exit 2, one line, no traceback (host has no sched_ext)."""
    path = _copy(BUNDLED, tmp_path / "m")
    _, entries = _bundle(path)
    entry = next(e for e in entries if e.key == "variables/2/.ATTRIBUTES/VARIABLE_VALUE")
    _flip(path / "variables" / DATA, entry.offset + 5)
    res = subprocess.run(
        [sys.executable, "-m", "loader.main", "--model", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert (
        f"corrupt variables at {path}/variables: tensor variables/2/.ATTRIBUTES/"
        f"VARIABLE_VALUE (dense_1/kernel): checksum mismatch in {DATA} "
        "(re-export the model)"
    ) in lines[0]


def test_fastpath_does_not_hide_corruption(tmp_path, dummy):
    """A verified fast-path file used to be the only guard; now a flip is refused outright."""
    path = _copy(dummy, tmp_path / "m")
    assert check_model_dir(path).fastpath_ok
    _flip(path / "variables" / DATA, 10)
    _refused(path, r"checksum mismatch")


def test_every_flipped_bit_is_caught_or_harmless(tmp_path, dummy):
    """Flip bit 0 of every byte of both files in turn: only CheckpointError ever comes out,
    and only bytes TF never reads (the metaindex block, its footer handle and the footer
    padding) go unnoticed."""
    path = _copy(dummy, tmp_path / "m")
    var_dir = path / "variables"
    index = (var_dir / "variables.index").read_bytes()
    footer = memoryview(index[-ci.FOOTER_SIZE :])
    meta_offset, meta_size, pos = ci._block_handle(footer, 0, "footer")
    _, _, index_handle_end = ci._block_handle(footer, pos, "footer")
    footer_start = len(index) - ci.FOOTER_SIZE
    unread = {*range(meta_offset, meta_offset + meta_size + ci.BLOCK_TRAILER_SIZE)}
    unread |= {footer_start + i for i in range(pos)}  # the metaindex handle
    unread |= {footer_start + i for i in range(index_handle_end, ci.FOOTER_SIZE - 8)}
    for name, data in [("variables.index", index), (DATA, (var_dir / DATA).read_bytes())]:
        passed = set()
        for i in range(len(data)):
            damaged = bytearray(data)
            damaged[i] ^= 0x01
            (var_dir / name).write_bytes(bytes(damaged))
            try:
                verify_checkpoint(var_dir)
                passed.add(i)
            except CheckpointError as e:
                assert "\n" not in str(e)
        (var_dir / name).write_bytes(data)
        assert passed == (unread if name == "variables.index" else set()), name
