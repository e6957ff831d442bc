"""Inference-time memory planning: blobs whose lifetimes do not overlap share one buffer.

A blob is alive from the first layer that touches it to the last layer that reads it. At TEST,
with no backward pass to come, its buffer can go to a later blob once that last reader has run,
as OpenCV dnn does. Blobs that already share memory (Flatten, Reshape, Split, in-place layers) are
planned as one group, since their `_Memory` is one object. Inputs, outputs, named blobs and
anything sharing memory with a parameter keep buffers of their own.
"""
import collections

from .blob import _Memory

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

    free, alive, buffers = [], [], 0
    for key in sorted(groups, key=first_use.__getitem__):
        if key in pinned:
            continue
        start = first_use[key]
        for ends, memory in [item for item in alive if item[0] < start]:
            alive.remove((ends, memory))
            free.append(memory)
        members = list(groups[key].values())
        need = max(blob.count for blob in members)
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
        alive.append((last_use[key], memory))
    return buffers
