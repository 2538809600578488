"""A state's arrays as a checkpoint holds them: raveled and concatenated into one 1-D array per
dtype, with the layout beside it (each array's path, shape and dtype, in the tree's order).

Orbax's cost is per array, not per byte: a checkpoint of the tiny model's 120 small arrays took
0.34 s of CPU to save, the same arrays packed into two took 0.045 s (AMD EPYC Zen 3;
docs/performance.md). Packing and unpacking are exact (bytes are copied, never converted), and
a checkpoint written before packing (one orbax array per state array) still reads
(`manager.Checkpoints` tells them apart by the `layout` item).
"""

from __future__ import annotations

import math

import jax
import numpy as np

VERSION = 1


def _path(path) -> list:
    """A tree path as JSON: ["attr", name] (a dataclass field), ["key", k] (a dict key),
    ["index", i] (a tuple or list position)."""
    out = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            out.append(["attr", entry.name])
        elif isinstance(entry, jax.tree_util.DictKey):
            out.append(["key", entry.key if isinstance(entry.key, (str, int)) else str(entry.key)])
        elif isinstance(entry, jax.tree_util.SequenceKey):
            out.append(["index", entry.idx])
        else:  # FlattenedIndexKey and others
            out.append(["index", int(getattr(entry, "key", 0))])
    return out


def _is_key(dtype) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _host(x) -> np.ndarray:
    """An array's values on the host (a replicated array's first addressable copy on any process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def pack(tree) -> tuple[dict, dict]:
    """({dtype name: 1-D array}, layout) of a pytree of arrays (PRNG keys as their key data)."""
    groups, rows = {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        impl = None
        if _is_key(leaf.dtype):
            impl, leaf = str(jax.random.key_impl(leaf)), jax.random.key_data(leaf)
        values = _host(leaf)
        groups.setdefault(values.dtype.name, []).append(values.ravel())
        rows.append([_path(path), list(values.shape), values.dtype.name] + ([impl] if impl else []))
    packed = {name: np.concatenate(parts) for name, parts in groups.items()}
    return packed, {"version": VERSION, "arrays": rows}


def arrays(packed: dict, layout: dict) -> list:
    """The state's arrays on the host, in the layout's order: (path, array, key impl or None)."""
    if layout.get("version") != VERSION:
        raise ValueError(f"packed by another version of resnet_jax (layout {layout.get('version')})")
    offsets, out = dict.fromkeys(packed, 0), []
    for row in layout["arrays"]:
        path, shape, dtype = row[:3]
        size, start = math.prod(shape), offsets.get(dtype, 0)
        flat = packed[dtype][start : start + size]
        if flat.size != size:
            raise ValueError(f"array {_text(path)} is cut short ({flat.size} of {size} values)")
        offsets[dtype] = start + size
        out.append((path, flat.reshape(shape), row[3] if len(row) > 3 else None))
    return out


def unpack(packed: dict, layout: dict, template=None):
    """The state: into `template` (its structure, shapes, dtypes and shardings; each array checked
    against the layout), or without one as nested dicts and lists of arrays on the default device
    (the top-level fields of a TrainState by name)."""
    found = arrays(packed, layout)
    if template is None:
        return _nested([(path, _place(a, None, impl)) for path, a, impl in found])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    if len(leaves) != len(found):
        raise ValueError(f"it holds {len(found)} arrays, the state has {len(leaves)}")
    placed = []
    for (path, like), (saved_path, a, impl) in zip(leaves, found):
        shape = tuple(like.shape) + ((a.shape[-1],) if impl else ())
        if _path(path) != saved_path or a.shape != shape:
            here = f"{_text(_path(path))} {tuple(like.shape)}"
            raise ValueError(f"array {_text(saved_path)} {a.shape} does not fit the state's {here}")
        placed.append(_place(a, getattr(like, "sharding", None), impl))
    return jax.tree_util.tree_unflatten(treedef, placed)


def _place(values: np.ndarray, sharding, impl):
    if impl is not None:  # key data: placed on the default device, then wrapped
        key = jax.random.wrap_key_data(jax.numpy.asarray(values), impl=impl)
        return key if sharding is None else jax.device_put(key, sharding)
    if sharding is None:
        return jax.numpy.asarray(values)
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def _nested(items):
    """Nested dicts (lists where every key is a position) from (path, value) pairs."""
    root = {}
    for path, value in items:
        node = root
        for _, key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1][1]] = value
    return _lists(root)


def _lists(node):
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node


def _text(path) -> str:
    return "".join(f".{k}" if kind == "attr" else f"[{k!r}]" for kind, k in path).lstrip(".")
