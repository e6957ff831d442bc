"""Layers that move data around without arithmetic: Flatten, Reshape, Concat, Slice, Tile,
Crop, BatchReindex, Filter.

Flatten and Reshape only change the shape, so their top shares data and diff with the
bottom (no copies). The others copy with numpy slicing; their gradients copy back (or,
for Tile and BatchReindex, sum the copies). Concat and Slice split their copies over the
shared thread pool (minicaffe.threads.copy_2d).
"""
import numpy as np

from ..blob import _Region
from ..layer import Layer, register_layer
from ..threads import copy_2d

__all__ = ["FlattenLayer", "ReshapeLayer", "ConcatLayer", "SliceLayer", "TileLayer", "CropLayer",
           "BatchReindexLayer", "FilterLayer"]


def _canonical_axis(layer, blob, axis):
    try:
        return blob.canonical_axis(axis)
    except IndexError as e:
        raise layer.error(str(e)) from None


def _column_blocks(whole, parts, axis):
    """[(block of whole, part as 2-D)]: the parts follow one another along `axis` of `whole`.

    whole (..., sum of the parts' sizes, ...) is viewed as (outer, rest) and each part as
    (outer, its rest), where outer is the product of the axes before `axis` (Concat, Slice).
    """
    if whole.size == 0:
        return []
    outer = int(np.prod(whole.shape[:axis], dtype=np.int64))
    inner = int(np.prod(whole.shape[axis + 1:], dtype=np.int64))
    whole_2d = whole.reshape(outer, -1)
    blocks, offset = [], 0
    for part in parts:
        size = part.shape[axis] * inner
        blocks.append((whole_2d[:, offset:offset + size], part.reshape(outer, size)))
        offset += size
    return blocks


def _address(array):
    return array.__array_interface__["data"][0]


def _runs_of(whole, parts, axis):
    """(whole, parts, where each part starts in whole) when two or more parts follow one another
    along `axis` and nothing but ones comes before it (each part one run of whole: channels at
    batch 1), else None. Inference nets place the parts there (memory_plan.py)."""
    if len(parts) < 2 or any(d != 1 for d in whole.shape[:axis]):
        return None
    starts = [0]
    for part in parts[:-1]:
        starts.append(starts[-1] + part.count)
    return whole, parts, starts


def _all_placed(parts, whole):
    """Whether every part's storage is its run of whole's, as an inference net places a Concat's
    bottoms and a Slice's tops (memory_plan.py): the forward has nothing to copy. A blob-level
    check, so that a batch-1 Concat costs a few attribute reads instead of building and comparing
    every block."""
    memory, offset = whole._data, 0
    for part in parts:
        region = part._data
        if type(region) is not _Region or region.own is not None or region.parent is not memory \
                or region.offset != offset:
            return False
        offset += part.count
    return True


def _copy_unplaced(pairs):
    """copy_2d the (dst, src) pairs, leaving out each one whose dst already is its src: the blobs
    an inference net placed inside another (memory_plan.py), where the copy would be a no-op."""
    pairs = [(dst, src) for dst, src in pairs
             if not (_address(dst) == _address(src) and (dst.shape[0] == 1 or dst.strides == src.strides))]
    if pairs:
        copy_2d(pairs)


def _share(top, bottom):
    top.share_data(bottom)
    top.share_diff(bottom)


def _refuse_in_place(layer, bottom, top):
    """Raise unless every top is a blob of its own (none of these layers can work in place)."""
    if any(t is b for t in top for b in bottom):
        raise layer.error(f"{layer.type} does not allow in-place computation; give the top "
                          f"its own name")


@register_layer("Flatten")
class FlattenLayer(Layer):
    """Merge axes axis..end_axis into one: (N, C, H, W) -> (N, C*H*W) by default.

    The top is a view of the bottom: it shares data and diff.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        p = self.layer_param.flatten_param
        start = _canonical_axis(self, bottom[0], p.axis)
        end = _canonical_axis(self, bottom[0], p.end_axis)
        if end < start:
            raise self.error(f"flatten_param.end_axis ({p.end_axis}) comes before axis ({p.axis}) "
                             f"for a {bottom[0].num_axes}-d bottom")
        shape = bottom[0].shape
        top[0].reshape(shape[:start] + (bottom[0].count(start, end + 1),) + shape[end + 1:])
        _share(top[0], bottom[0])

    def forward(self, bottom, top):
        pass  # the data is shared

    def backward(self, top, propagate_down, bottom):
        pass  # the diff is shared


@register_layer("Reshape")
class ReshapeLayer(Layer):
    """Give the bottom a new shape without copying (top shares data and diff).

    reshape_param.shape replaces axes [axis, axis + num_axes) of the bottom (all by default);
    a 0 copies the bottom's dimension at that place, one -1 is inferred from the count.
    """

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        dims = list(self.layer_param.reshape_param.shape.dim)
        if any(d < -1 for d in dims):
            raise self.error(f"reshape_param.shape {dims} may only hold positive sizes, 0 (copy "
                             f"the bottom's dimension) and one -1 (infer it)")
        if dims.count(-1) > 1:
            raise self.error(f"reshape_param.shape {dims} contains more than one -1; at most one "
                             f"dimension can be inferred")
        self.dims = dims
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        self.inferred_axis = dims.index(-1) if -1 in dims else None
        self.constant_count = int(np.prod([d for d in dims if d > 0], dtype=np.int64))

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        p = self.layer_param.reshape_param
        n = bottom[0].num_axes
        start = p.axis if p.axis >= 0 else n + p.axis + 1
        if not 0 <= start <= n:
            raise self.error(f"reshape_param.axis {p.axis} is out of range for the "
                             f"{n}-d bottom {bottom[0].shape}")
        if p.num_axes < -1:
            raise self.error("reshape_param.num_axes must be >= 0, or -1 for all")
        end = n if p.num_axes == -1 else start + p.num_axes
        if end > n:
            raise self.error(f"reshape_param.axis + num_axes = {end} is out of range for the "
                             f"{n}-d bottom {bottom[0].shape}")
        new = list(self.dims)
        for i in self.copy_axes:
            if start + i >= n:
                raise self.error(f"reshape_param.shape has a 0 at position {i} but the bottom "
                                 f"{bottom[0].shape} has no axis {start + i} to copy")
            new[i] = bottom[0].shape[start + i]
        if self.inferred_axis is not None:
            explicit = int(np.prod([d for i, d in enumerate(new) if i != self.inferred_axis],
                                   dtype=np.int64))
            explicit *= bottom[0].count(0, start) * bottom[0].count(end)
            if explicit == 0 or bottom[0].count() % explicit:
                raise self.error(f"bottom count ({bottom[0].count()}) must be divisible by the "
                                 f"product of the specified dimensions ({explicit})")
            new[self.inferred_axis] = bottom[0].count() // explicit
        shape = bottom[0].shape[:start] + tuple(new) + bottom[0].shape[end:]
        if int(np.prod(shape, dtype=np.int64)) != bottom[0].count():
            raise self.error(f"output count must match input count: cannot reshape "
                             f"{bottom[0].shape} to {shape}")
        top[0].reshape(shape)
        _share(top[0], bottom[0])

    def forward(self, bottom, top):
        pass  # the data is shared

    def backward(self, top, propagate_down, bottom):
        pass  # the diff is shared


def _legacy_axis(layer, bottom, param, legacy_field, what):
    """The axis from `axis` or the deprecated uint32 `<legacy_field>` (never both)."""
    if param.HasField("axis") and param.HasField(legacy_field):
        raise layer.error(f"give either {what}.axis or {what}.{legacy_field}, not both")
    if param.HasField(legacy_field):
        axis = getattr(param, legacy_field)
        if axis >= bottom.num_axes:
            raise layer.error(f"{what}.{legacy_field} {axis} is out of range for the "
                              f"{bottom.num_axes}-d bottom {bottom.shape}")
        return axis
    return _canonical_axis(layer, bottom, param.axis)


@register_layer("Concat")
class ConcatLayer(Layer):
    """Join the bottoms along `axis` (default 1, channels); all other dimensions must agree."""

    min_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error("give either concat_param.axis or concat_param.concat_dim, not both")

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        axis = _legacy_axis(self, bottom[0], self.layer_param.concat_param, "concat_dim",
                            "concat_param")
        shape = list(bottom[0].shape)
        for i, b in enumerate(bottom[1:], 1):
            if b.num_axes != len(shape):
                raise self.error(f"all inputs must have the same number of axes: bottom[0] is "
                                 f"{bottom[0].shape}, bottom[{i}] is {b.shape}")
            if any(b.shape[j] != shape[j] for j in range(len(shape)) if j != axis):
                raise self.error(f"all inputs must have the same shape except on the concat "
                                 f"axis {axis}: bottom[0] is {bottom[0].shape}, bottom[{i}] is "
                                 f"{b.shape}")
            shape[axis] += b.shape[axis]
        self.axis = axis
        top[0].reshape(shape)
        if len(bottom) == 1:
            _share(top[0], bottom[0])

    def runs_of_one_blob(self, bottom, top):
        """The bottoms as runs of the top (_runs_of), or None."""
        return _runs_of(top[0], bottom, self.axis)

    def forward(self, bottom, top):
        if len(bottom) > 1 and not _all_placed(bottom, top[0]):
            _copy_unplaced(_column_blocks(top[0].data, [b.data for b in bottom], self.axis))

    def backward(self, top, propagate_down, bottom):
        if len(bottom) == 1:
            return
        blocks = _column_blocks(top[0].diff, [b.diff for b in bottom], self.axis)
        copy_2d([(b, part_of_top) for (part_of_top, b), down in zip(blocks, propagate_down)
                 if down])


@register_layer("Slice")
class SliceLayer(Layer):
    """Cut the bottom along `axis` (default 1) at `slice_point`s, or into equal parts."""

    exact_num_bottom = 1
    min_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.error("give either slice_param.axis or slice_param.slice_dim, not both")
        self.points = list(p.slice_point)
        if self.points and any(b <= a for a, b in zip([0] + self.points, self.points)):
            raise self.error(f"slice_param.slice_point {self.points} must be positive and "
                             f"strictly increasing")

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        axis = _legacy_axis(self, bottom[0], self.layer_param.slice_param, "slice_dim",
                            "slice_param")
        size = bottom[0].shape[axis]
        if self.points:
            if len(self.points) != len(top) - 1:
                raise self.error(f"{len(self.points)} slice points need {len(self.points) + 1} "
                                 f"tops, got {len(top)}")
            if len(top) > size or self.points[-1] >= size:
                raise self.error(f"slice points {self.points} do not fit axis {axis} of size "
                                 f"{size} (bottom {bottom[0].shape})")
            bounds = [0] + self.points + [size]
        else:
            if size % len(top):
                raise self.error(f"number of top blobs ({len(top)}) should evenly divide the "
                                 f"slice axis {axis} of size {size}")
            bounds = [i * size // len(top) for i in range(len(top) + 1)]
        self.axis = axis
        self.bounds = bounds
        shape = list(bottom[0].shape)
        for t, start, stop in zip(top, bounds, bounds[1:]):
            shape[axis] = stop - start
            t.reshape(shape)
        if len(top) == 1:
            _share(top[0], bottom[0])

    def runs_of_one_blob(self, bottom, top):
        """The tops as runs of the bottom (_runs_of), or None."""
        return _runs_of(bottom[0], top, self.axis)

    def forward(self, bottom, top):
        if len(top) == 1 or _all_placed(top, bottom[0]):
            return
        blocks = _column_blocks(bottom[0].data, [t.data for t in top], self.axis)
        _copy_unplaced([(part, part_of_whole) for part_of_whole, part in blocks])

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0] or len(top) == 1:
            return
        copy_2d(_column_blocks(bottom[0].diff, [t.diff for t in top], self.axis))


@register_layer("Tile")
class TileLayer(Layer):
    """Repeat the block of axes axis.. `tiles` times: (N, C, H) -> (N, tiles*C, H) for axis 1."""

    exact_num_bottom = 1
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.tile_param
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles (the number of copies) must be given")
        if p.tiles <= 0:
            raise self.error(f"tile_param.tiles must be positive, got {p.tiles}")
        self.tiles = p.tiles

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        axis = _canonical_axis(self, bottom[0], self.layer_param.tile_param.axis)
        shape = list(bottom[0].shape)
        shape[axis] *= self.tiles
        top[0].reshape(shape)
        self.outer = bottom[0].count(0, axis)
        self.inner = bottom[0].count(axis)

    def forward(self, bottom, top):
        out = top[0].data.reshape(self.outer, self.tiles, self.inner)
        out[...] = bottom[0].data.reshape(self.outer, 1, self.inner)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            np.sum(top[0].diff.reshape(self.outer, self.tiles, self.inner), axis=1,
                   out=bottom[0].diff.reshape(self.outer, self.inner))


@register_layer("Crop")
class CropLayer(Layer):
    """Crop bottom[0] to bottom[1]'s shape on axes axis.. (default 2), starting at `offset`.

    offset: none (all 0), one value for every cropped axis, or one per cropped axis.
    """

    exact_num_bottom = 2
    exact_num_top = 1

    def layer_setup(self, bottom, top):
        p = self.layer_param.crop_param
        start = _canonical_axis(self, bottom[0], p.axis)
        n = bottom[0].num_axes
        if len(p.offset) > 1 and start + len(p.offset) != n:
            raise self.error(f"crop_param.offset has {len(p.offset)} values but axes {start}.."
                             f"{n - 1} of the bottom are cropped: give one value or {n - start}")

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        p = self.layer_param.crop_param
        big, ref = bottom
        start = _canonical_axis(self, big, p.axis)
        if ref.num_axes < big.num_axes:
            raise self.error(f"bottom[1] {ref.shape} needs at least as many axes as bottom[0] "
                             f"{big.shape}")
        shape, self.index = [], []
        for i in range(big.num_axes):
            if i < start:
                size, offset = big.shape[i], 0
            else:
                size = ref.shape[i]
                offset = p.offset[0] if len(p.offset) == 1 else (
                    p.offset[i - start] if len(p.offset) else 0)
                if big.shape[i] - offset < size:
                    raise self.error(f"the crop for axis {i} is out of bounds: size {size} at "
                                     f"offset {offset} does not fit in {big.shape[i]}")
            shape.append(size)
            self.index.append(slice(offset, offset + size))
        self.index = tuple(self.index)
        top[0].reshape(shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[self.index]

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            diff = bottom[0].diff
            diff[...] = 0
            diff[self.index] = top[0].diff
        if propagate_down[1]:
            # Only bottom[1]'s shape is used, so its gradient is zero.
            bottom[1].diff[...] = 0


@register_layer("BatchReindex")
class BatchReindexLayer(Layer):
    """top[i] = bottom[0][index[i]]: pick (and repeat or reorder) items of the batch.

    bottom[1]: a 1-d blob of item indices; the top has len(index) items.
    """

    exact_num_bottom = 2
    exact_num_top = 1

    def allow_force_backward(self, bottom_index):
        # Indices take no gradient (Caffe would abort in Backward).
        return bottom_index != 1

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        if bottom[1].num_axes != 1:
            raise self.error(f"the index blob bottom[1] must be 1-d, got shape {bottom[1].shape}")
        top[0].reshape((bottom[1].shape[0],) + bottom[0].shape[1:])

    def _indices(self, bottom):
        index = bottom[1].data.astype(np.int64)
        bad = (index < 0) | (index >= bottom[0].shape[0])
        if bad.any():
            raise self.error(f"index {bottom[1].data[bad][0]:g} in bottom[1] is out of range for "
                             f"a batch of {bottom[0].shape[0]} items")
        return index

    def forward(self, bottom, top):
        self.index = self._indices(bottom)
        np.take(bottom[0].data, self.index, axis=0, out=top[0].data)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[1]:
            raise self.error("cannot backpropagate to the index input bottom[1]")
        if not propagate_down[0]:
            return
        diff = bottom[0].diff
        diff[...] = 0
        # An item picked several times collects the gradient of every copy.
        np.add.at(diff, self.index, top[0].diff)


@register_layer("Filter")
class FilterLayer(Layer):
    """Keep the items whose selector is non-zero: top[i] = bottom[i][selector != 0].

    The last bottom is the selector (N, 1, ...); one top per other bottom. The tops' first
    dimension changes with the selector (the first reshape, at setup, uses the full batch).
    """

    min_num_bottom = 2
    min_num_top = 1

    def layer_setup(self, bottom, top):
        if len(top) != len(bottom) - 1:
            raise self.error(f"Filter needs one top per filtered bottom: {len(bottom) - 1} "
                             f"bottoms besides the selector but {len(top)} tops")
        self.selector_index = len(bottom) - 1
        self.first_reshape = True

    def allow_force_backward(self, bottom_index):
        # The selector takes no gradient (Caffe would abort in Backward).
        return bottom_index != getattr(self, "selector_index", None)

    def reshape(self, bottom, top):
        _refuse_in_place(self, bottom, top)
        selector = bottom[-1]
        if any(d != 1 for d in selector.shape[1:]):
            raise self.error(f"selector blob dimensions must be singletons (1), except the "
                             f"first; got {selector.shape}")
        for i, b in enumerate(bottom[:-1]):
            if b.shape[:1] != selector.shape[:1]:
                raise self.error(f"bottom[{i}] {b.shape} must have the same first dimension as "
                                 f"the selector {selector.shape}")
        self.indices = np.flatnonzero(selector.data.reshape(-1))
        # At setup the selector may hold nothing meaningful yet, so size for the whole batch.
        num = selector.shape[0] if self.first_reshape else len(self.indices)
        self.first_reshape = False
        for t, b in zip(top, bottom):
            t.reshape((num,) + b.shape[1:])

    def forward(self, bottom, top):
        for t, b in zip(top, bottom):
            np.take(b.data, self.indices, axis=0, out=t.data[:len(self.indices)])

    def backward(self, top, propagate_down, bottom):
        if propagate_down[-1]:
            raise self.error("cannot backpropagate to the selector input (the last bottom)")
        for t, b, down in zip(top, bottom, propagate_down):
            if down:
                diff = b.diff
                diff[...] = 0
                diff[self.indices] = t.diff[:len(self.indices)]
