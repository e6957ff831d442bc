"""Inference-time memory planning: blobs whose lifetimes do not overlap share one buffer.

A blob is alive from the first layer that touches it to the last layer that reads it. At TEST,
with no backward pass to come, its buffer can go to a later blob once that last reader has run,
as OpenCV dnn does. Blobs that already share memory (Flatten, Reshape, Split, in-place layers) are
planned as one group, since their `_Memory` is one object. Inputs, outputs, named blobs and
anything sharing memory with a parameter keep buffers of their own.

A Concat whose bottoms are consecutive ranges of its top (nothing but ones before the concat
axis: channels at batch 1) gets them placed there (blob._Region), when the Concat is their last
reader: their producers then write straight into the top, and the Concat has nothing to copy.
A Slice's tops are placed inside its bottom the same way, when it is the bottom's last reader.
A part that cannot be placed keeps a buffer of its own, and only it is copied.
"""
import collections

from .blob import _Memory, _Region

__all__ = ["share_dead_buffers"]


def share_dead_buffers(layers, bottom_vecs, top_vecs, keep_blobs):
    """Point the data of blobs with disjoint lifetimes at shared buffers; returns the buffer count.

    Buffers are handed out best-fit by size in order of first use, so big activations early in a
    net are reused by the big activations that follow, and the 1x1-sized tails reuse small ones.
    """
    first_use, last_use = {}, {}
    groups = collections.defaultdict(dict)   # id(_Memory) -> {id(blob): blob}
    for index, blobs in enumerate(zip(bottom_vecs, top_vecs)):
        for blob in blobs[0] + blobs[1]:
            key = id(blob._data)
            first_use.setdefault(key, index)
            last_use[key] = index
            groups[key][id(blob)] = blob
    pinned = {id(blob._data) for blob in keep_blobs}
    pinned |= {id(param._data) for layer in layers for param in layer.blobs}
    joins = _joins(layers, bottom_vecs, top_vecs, groups, last_use, pinned)
    for whole, parts in joins.items():   # the whole's buffer lives as long as any part of it
        first_use[whole] = min([first_use[whole]] + [first_use[key] for key, _ in parts])
        last_use[whole] = max([last_use[whole]] + [last_use[key] for key, _ in parts])
    inside = {key for parts in joins.values() for key, _ in parts}

    free, alive, buffers = [], [], 0
    for key in sorted(groups, key=first_use.__getitem__):
        if key in inside:
            continue
        members = list(groups[key].values())
        need = max(blob.count for blob in members)
        if key in pinned:
            memory = members[0]._data
            memory.ensure(need)
            _place_parts(memory, joins.get(key, ()), groups)
            continue
        start = first_use[key]
        for ends, memory in [item for item in alive if item[0] < start]:
            alive.remove((ends, memory))
            free.append(memory)
        fitting = [m for m in free if m.buf.size >= need]
        if fitting:
            memory = min(fitting, key=lambda m: m.buf.size)
        elif free:
            memory = max(free, key=lambda m: m.buf.size)
        else:
            memory = _Memory(0, members[0].dtype)
            buffers += 1
        if memory in free:
            free.remove(memory)
        memory.ensure(need)
        for blob in members:
            blob._data = memory
        _place_parts(memory, joins.get(key, ()), groups)
        alive.append((last_use[key], memory))
    return buffers


def _joins(layers, bottom_vecs, top_vecs, groups, last_use, pinned):
    """{whole's group: [(part's group, offset)]} for the layers whose blobs can be runs of one
    buffer (Concat's bottoms in its top, Slice's tops in its bottom: `runs_of_one_blob`).

    The layer must be the last reader of what it places: a Concat's top may change in place
    later (so a bottom placed in it is read no more), and so may a Slice's tops (so its bottom is
    read no more, and is not kept). Each group takes part in one such layer at most; a part that
    cannot be placed keeps a buffer of its own and the layer copies it (ShuffleNet v2: a Slice's
    first top lives in the Slice's bottom, so the Concat that reads it next copies that one)."""
    joins, taken = {}, set()
    for index, layer in enumerate(layers):
        runs = getattr(layer, "runs_of_one_blob", lambda bottom, top: None)(
            bottom_vecs[index], top_vecs[index])
        if runs is None:
            continue
        whole, parts, offsets = runs
        whole_key = id(whole._data)
        keys = [id(blob._data) for blob in parts]
        read_here = {id(blob._data) for blob in bottom_vecs[index]}
        if (whole_key in taken or whole_key in keys or len(set(keys)) < len(keys)
                or whole_key in read_here and (whole_key in pinned or last_use[whole_key] != index)):
            continue
        placed = [(key, offset) for key, blob, offset in zip(keys, parts, offsets)
                  if key not in pinned and key not in taken
                  and (key not in read_here or last_use[key] == index)
                  and blob.dtype == whole.dtype
                  and all(member.count == blob.count for member in groups[key].values())]
        if placed:
            joins[whole_key] = placed
            taken.update([key for key, _ in placed] + [whole_key])
    return joins


def _place_parts(memory, parts, groups):
    family = []
    for key, offset in parts:
        members = list(groups[key].values())
        region = _Region(memory, offset, members[0].count, family)
        for blob in members:
            blob._data = region
