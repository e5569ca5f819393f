"""Online-store rows from Arrow without Feast's per-entry conversion.

``FeatureStore.write_to_online_store`` turns a frame into protobuf values one Python object
per list entry (``feast.type_map``: each list becomes a Python list, each entry is checked,
then copied into the message). A user's history row carries up to ``HISTORY_LEN`` entries in
three lists, so a day's materialization cost followed the users' history lengths, not the
day's rows: 46,000 rows of ~80 entries took ~8 s to convert against ~2.5 s at ~5 entries.

Here the list columns (``Array(String)``, ``Array(Int64)``, ``Array(Float64)``: every list
type the repo declares) are encoded into the protobuf wire format with numpy, all entries of
a column at once, and each row's ``Value`` is parsed from its bytes (in C); scalar columns,
entity keys and timestamps go through Feast's own functions. The result is the rows Feast
would build, byte for byte (``tests/unit/test_online_write.py`` compares them), handed to
the provider's ``online_write_batch`` as ``ingest_df`` does: any online store (SQLite,
Redis, ...) receives the same values. A list column with a null entry (which Feast replaces
by a default) is left to Feast.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

_TAG_ENTRY = 0x0A  # field 1 (``val``), length-delimited: each string, or a packed payload


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_sizes(values: np.ndarray) -> np.ndarray:
    """(n,) bytes of each unsigned value's varint."""
    sizes = np.ones(len(values), np.int64)
    for k in range(1, 10):
        sizes += values >= np.uint64(1 << (7 * k))
    return sizes


def _put_varints(out: np.ndarray, at: np.ndarray, values: np.ndarray,
                 sizes: np.ndarray) -> None:
    """Write each value's varint into ``out`` from position ``at``."""
    for k in range(int(sizes.max(initial=0))):
        rows = sizes > k
        byte = (values[rows] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = np.where(sizes[rows] > k + 1, 0x80, 0).astype(np.uint64)
        out[at[rows] + k] = (byte | more).astype(np.uint8)


def _string_entries(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Each string as a ``StringList`` entry (tag, length, UTF-8): the bytes of all of them
    in order, and (n + 1,) offsets of each entry in them."""
    values = values.cast(pa.large_string()) if not pa.types.is_large_string(values.type) \
        else values
    width = np.int64
    offsets = np.frombuffer(values.buffers()[1], width)[values.offset:
                                                        values.offset + len(values) + 1]
    data = np.frombuffer(values.buffers()[2], np.uint8) if values.buffers()[2] is not None \
        else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)  # (n,)
    length_sizes = _varint_sizes(lengths.astype(np.uint64))
    entry = 1 + length_sizes + lengths
    bounds = np.concatenate([[0], np.cumsum(entry)])
    out = np.empty(int(bounds[-1]), np.uint8)
    is_data = np.ones(len(out), bool)
    starts = bounds[:-1]
    out[starts] = _TAG_ENTRY
    is_data[starts] = False
    for k in range(int(length_sizes.max(initial=0))):
        is_data[starts[length_sizes > k] + 1 + k] = False
    _put_varints(out, starts + 1, lengths.astype(np.uint64), length_sizes)
    out[is_data] = data[offsets[0]:offsets[-1]] if len(offsets) else data[:0]
    return out, bounds


def _packed_entries(values: pa.Array, floats: str = "<f8") -> tuple[np.ndarray, np.ndarray]:
    """Packed numbers (int64 varints, or floats little-endian: ``floats`` "<f8" for a
    double list, "<f4" for a float list): their bytes in order and (n + 1,) offsets of each
    number in them."""
    if pa.types.is_floating(values.type):
        raw = values.to_numpy(zero_copy_only=False).astype(floats)
        width = raw.dtype.itemsize
        return raw.view(np.uint8), np.arange(len(raw) + 1, dtype=np.int64) * width
    numbers = values.cast(pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
    unsigned = numbers.view(np.uint64)  # negatives: ten-byte two's complement, as protobuf
    sizes = _varint_sizes(unsigned)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out = np.empty(int(bounds[-1]), np.uint8)
    _put_varints(out, bounds[:-1], unsigned, sizes)
    return out, bounds


def _header_positions(at: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Every position of ``sizes[i]`` bytes from ``at[i]``, for each i."""
    first = np.cumsum(sizes) - sizes
    return np.repeat(at, sizes) + np.arange(int(sizes.sum())) - np.repeat(first, sizes)


def list_values(column: pa.Array | pa.ChunkedArray, field_number: int,
                packed: bool, floats: str = "<f8") -> list[Any]:
    """The ``Value`` protos of a list column: its field set to the row's list, or empty for
    a null row (as Feast writes them). Each row's message is laid out in one buffer with
    numpy (field tag, length, for packed numbers the list's own tag and length, the
    entries) and parsed from its bytes."""
    from feast.protos.feast.types.Value_pb2 import Value

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten()  # the entries of the non-null rows, in order
    data, bounds = _packed_entries(flat, floats) if packed else _string_entries(flat)
    sizes = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    body = bounds[starts[1:]] - bounds[starts[:-1]]  # (R,) the entries' bytes per row
    nulls = column.is_null().to_numpy(zero_copy_only=False)  # (R,)
    tag = np.frombuffer(_varint((field_number << 3) | 2), np.uint8)
    inner_head = np.where(packed & (body > 0), 1 + _varint_sizes(body.astype(np.uint64)), 0)
    inner = inner_head + body  # (R,) the list message's bytes
    outer_size = _varint_sizes(inner.astype(np.uint64))
    head = np.where(nulls, 0, len(tag) + outer_size + inner_head)  # (R,) bytes before entries
    total = head + np.where(nulls, 0, body)
    offsets = np.concatenate([[0], np.cumsum(total)]).astype(np.int64)
    at = offsets[:-1]
    out = np.empty(int(offsets[-1]), np.uint8)
    is_entry = np.ones(len(out), bool)
    is_entry[_header_positions(at, head)] = False
    out[is_entry] = data  # null rows hold no entries: the entries in row order fill the rest
    rows = ~nulls
    for k, byte in enumerate(tag):
        out[at[rows] + k] = byte
    _put_varints(out, at[rows] + len(tag), inner[rows].astype(np.uint64), outer_size[rows])
    if packed:
        listed = rows & (body > 0)
        list_at = at[listed] + len(tag) + outer_size[listed]
        out[list_at] = _TAG_ENTRY
        _put_varints(out, list_at + 1, body[listed].astype(np.uint64),
                     inner_head[listed] - 1)
    buffer = out.tobytes()
    bounds_list = offsets.tolist()
    parse = Value.FromString
    return [Value() if null else parse(buffer[bounds_list[i]:bounds_list[i + 1]])
            for i, null in enumerate(nulls.tolist())]


def _scalar_values(column: pa.ChunkedArray, value_type: Any) -> list[Any] | None:
    """Scalar ``Value`` protos of a column without nulls (strings, int64, float64 without
    NaN), else None (Feast's turn: it decides what a missing value becomes)."""
    from feast.protos.feast.types.Value_pb2 import Value

    if column.null_count:
        return None
    name = value_type.name
    if name == "STRING" and pa.types.is_string(column.type):
        return [Value(string_val=v) for v in column.to_pylist()]
    if name == "INT64" and pa.types.is_integer(column.type):
        return [Value(int64_val=v) for v in column.to_pylist()]
    if name == "DOUBLE" and pa.types.is_floating(column.type):
        values = column.to_numpy()
        if np.isnan(values).any():
            return None
        return [Value(double_val=v) for v in values.tolist()]
    return None


_LIST_FIELDS = {"STRING_LIST": ("string_list_val", False, ""),
                "INT64_LIST": ("int64_list_val", True, ""),
                "DOUBLE_LIST": ("double_list_val", True, "<f8"),
                "FLOAT_LIST": ("float_list_val", True, "<f4")}


def _fast_column(column: pa.ChunkedArray, value_type: Any) -> list[Any] | None:
    """The values of a column this module encodes (``list_values``, ``_scalar_values``),
    else None (Feast's turn)."""
    from feast.protos.feast.types.Value_pb2 import Value

    field = _LIST_FIELDS.get(value_type.name)
    if field is None:
        return _scalar_values(column, value_type)
    if not pa.types.is_list(column.type) and \
            not pa.types.is_large_list(column.type):
        return None
    combined = column.combine_chunks()
    if combined.flatten().null_count:  # Feast puts defaults in place of null entries
        return None
    name, packed, floats = field
    if floats and not pa.types.is_floating(combined.type.value_type):
        return None
    return list_values(combined, Value.DESCRIPTOR.fields_by_name[name].number, packed,
                       floats or "<f8")


def online_rows(table: pa.Table, view: Any) -> list[tuple[Any, dict[str, Any], Any, Any]]:
    """The rows ``feast.utils._convert_arrow_to_proto`` builds for ``view`` from ``table``
    (entity key, feature values, event time, created time), list columns encoded here."""
    import pandas as pd
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.type_map import python_values_to_proto_values
    from feast.utils import _coerce_datetime

    join_keys = {entity.name: entity.dtype.to_value_type() for entity in view.entity_columns}
    values: dict[str, list[Any]] = {}
    for name, value_type in [(f.name, f.dtype.to_value_type()) for f in view.features] + \
            list(join_keys.items()):
        column = table[name]
        fast = _fast_column(column, value_type)
        values[name] = fast if fast is not None else python_values_to_proto_values(
            column.to_numpy(zero_copy_only=False), value_type)
    keys = [EntityKey(join_keys=list(join_keys), entity_values=[values[k][i] for k in join_keys])
            for i in range(table.num_rows)]
    features = [f.name for f in view.features]
    rows = [dict(zip(features, row, strict=True))
            for row in zip(*(values[f] for f in features), strict=True)]
    source = view.batch_source

    def times(column: str) -> list[Any]:
        return [_coerce_datetime(v) for v in pd.to_datetime(
            table[column].to_numpy(zero_copy_only=False))]

    stamps = times(source.timestamp_field)
    created = (times(source.created_timestamp_column) if source.created_timestamp_column
               else [None] * table.num_rows)
    return list(zip(keys, rows, stamps, created, strict=True))


def write_online(store: Any, view_name: str, table: pa.Table, chunk_rows: int) -> int:
    """Write ``table``'s rows (one per entity) to the online store of ``store`` for the
    view, ``chunk_rows`` at a time (bounded protobuf memory). Returns the rows written."""
    if not table.num_rows:
        return 0
    view = store.get_feature_view(view_name)
    provider = store._get_provider()  # what write_to_online_store hands its rows to
    for at in range(0, table.num_rows, chunk_rows):
        provider.online_write_batch(store.config, view,
                                    online_rows(table.slice(at, chunk_rows), view), None)
    return table.num_rows
