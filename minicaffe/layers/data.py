"""Data layers: the bottom-less layers that feed a net from a dataset.

- Data: an LMDB/LevelDB of Datum records, prefetched in a background thread.
- ImageData: image files listed with their labels in a text file (needs Pillow).
- HDF5Data: arrays from .h5 files named after the tops (needs h5py).
- MemoryData: numpy arrays handed in from Python with `set_input_arrays`.

Data and ImageData apply `transform_param` (see minicaffe.data_transformer) and
produce tops `data` (N, C, H, W) and `label` (N,). They have no backward.
"""
import atexit
import os
import queue
import threading
import warnings
import weakref

import numpy as np

from ..data_transformer import DataTransformer, TransformError
from ..db import DBError, ShardedCursor, decode_batch, open_reader
from ..layer import Layer, register_layer
from ..parallel.context import shard_bounds_ok, solver_count
from ..proto import caffe_pb2
from .. import rng as _rng

TRAIN = caffe_pb2.TRAIN


# -- background prefetching ----------------------------------------------------------
_live_prefetchers = weakref.WeakSet()


@atexit.register
def _stop_all_prefetchers():
    for prefetcher in list(_live_prefetchers):
        prefetcher.stop()


_STOP = object()


class _Failure:
    """An exception raised in the prefetch thread, to be re-raised by the consumer."""

    def __init__(self, exc):
        self.exc = exc


class Prefetcher:
    """Runs `produce(buffer) -> buffer` ahead of time, keeping up to `depth` batches ready.

    As in Caffe, a fixed set of `depth` buffers cycles between a free and a full
    queue, so batch arrays are reused rather than reallocated. With depth 0 the
    batch is produced on demand in the calling thread (handy for debugging).
    Batches come from one thread in order, so results do not depend on timing.
    """

    def __init__(self, produce, depth, name="prefetch"):
        self.produce = produce
        self.depth = int(depth)
        self.failure = None
        self.thread = None
        self._stop = threading.Event()
        self._spare = None
        if self.depth > 0:
            self.free, self.full = queue.Queue(), queue.Queue()
            for _ in range(self.depth):
                self.free.put(None)  # buffers are allocated by produce() on first use
            self.thread = threading.Thread(target=self._run, name=name, daemon=True)
            _live_prefetchers.add(self)
            self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            buffer = self.free.get()
            if buffer is _STOP:
                break
            try:
                buffer = self.produce(buffer)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                self.full.put(_Failure(exc))
                return
            self.full.put(buffer)

    def get(self):
        """The next batch; give it back with `release` once copied out."""
        if self.failure is not None:
            raise self.failure
        if self.thread is None:
            self._spare = self.produce(self._spare)
            return self._spare
        while True:
            try:
                item = self.full.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the prefetch thread has stopped")
        if isinstance(item, _Failure):
            self.failure = item.exc
            raise item.exc
        return item

    def release(self, buffer):
        if self.thread is not None:
            self.free.put(buffer)

    def stop(self):
        self._stop.set()
        thread = self.thread
        if thread is not None:
            self.free.put(_STOP)  # wakes the thread if it waits for a free buffer
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=5)


class _Batch:
    """Reusable arrays for one batch: data (N, C, H, W) and labels (N,)."""

    __slots__ = ("data", "label", "resume")

    def __init__(self):
        self.data = None
        self.label = None
        self.resume = None   # the loader's position after this batch (see snapshot_state)

    def arrays(self, data_shape, n, dtype):
        if self.data is None or self.data.shape != data_shape or self.data.dtype != dtype:
            self.data = np.empty(data_shape, dtype=dtype)
        if self.label is None or self.label.shape != (n,) or self.label.dtype != dtype:
            self.label = np.empty(n, dtype=dtype)
        return self.data, self.label


# -- shared base -------------------------------------------------------------------------
class _BaseDataLayer(Layer):
    """Common part of the data layers: no bottoms, optional label top, no backward."""

    exact_num_bottom = 0
    min_num_top = 1
    max_num_top = 2

    def _setup_common(self, top):
        # Bottom-less: take the precision of the net's blobs rather than assuming float32.
        self.dtype = top[0].dtype
        self.output_labels = len(top) > 1
        try:
            self.transformer = DataTransformer(self.layer_param.transform_param, self.phase,
                                               dtype=self.dtype)
        except TransformError as exc:
            raise self.error(f"transform_param: {exc}") from None

    def _check_batch_size(self, batch_size, where):
        if batch_size <= 0:
            raise self.error(f"{where}.batch_size must be positive, got {batch_size}")
        return int(batch_size)

    def reshape(self, bottom, top):
        pass  # tops take each batch's shape in forward

    def backward(self, top, propagate_down, bottom):
        pass  # data layers have no bottoms

    def _start_prefetch(self, produce, depth, resources=()):
        """Start prefetching; `resources` (cursors, readers) are closed after the thread stops."""
        self.close()
        prefetcher = Prefetcher(produce, depth, name=f"prefetch {self.name}")
        # The finalizer holds the prefetcher, not the layer, so the layer can be collected.
        self._finalizer = weakref.finalize(self, _shutdown, prefetcher, list(resources))
        self._prefetcher = prefetcher

    def _forward_prefetched(self, top):
        try:
            batch = self._prefetcher.get()
        except (DBError, TransformError, ValueError, OSError) as exc:
            raise self.error(str(exc)) from None
        if batch.resume is not None:
            # The prefetch thread runs ahead; a snapshot must resume after the batch used last.
            self._position = batch.resume
        top[0].reshape(batch.data.shape)
        top[0].data[...] = batch.data
        if self.output_labels:
            top[1].reshape(batch.label.shape)
            top[1].data[...] = batch.label
        self._prefetcher.release(batch)

    def _seek_prefetched(self, state, depth):
        """Stop prefetching, move the loader to a saved position, prefetch again from there."""
        prefetcher = self._prefetcher
        self._finalizer.detach()   # stop the thread but keep the cursor and database open
        prefetcher.stop()
        if prefetcher.thread is not None and prefetcher.thread.is_alive():
            raise self.error("the prefetch thread did not stop; cannot move to the saved position")
        consumed = self._position
        try:
            self._loader.seek(state)
        except (DBError, KeyError, TypeError, ValueError) as exc:
            self._loader.seek(consumed)   # back to the batch after the last one served
            message = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise self.error(f"cannot resume from the saved position: {message}") from None
        finally:
            self._position = self._loader.position()
            self._start_prefetch(self._loader, depth, resources=self._resources)

    def close(self):
        """Stop the prefetch thread and close the source (also done on garbage collection)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def _warn_deprecated(self, param, where):
        old = [f for f in ("scale", "mean_file", "crop_size", "mirror") if param.HasField(f)]
        if old:
            warnings.warn(f"layer {self.name!r}: {where}.{'/'.join(old)} are ignored (as in Caffe); "
                          f"put them in transform_param instead", stacklevel=3)


def _shutdown(prefetcher, resources):
    prefetcher.stop()
    for resource in resources:
        resource.close()


def _transformed_batch(transformer, raw, labels, buffer, dtype):
    """Transform raw (N, C, H, W) images and labels into a (reused) _Batch."""
    buffer = buffer or _Batch()
    n = raw.shape[0]
    shape = (n,) + transformer.output_shape(raw.shape[1:])
    data, label = buffer.arrays(shape, n, dtype)
    transformer.transform(raw, out=data)
    label[...] = labels
    return buffer


# -- Data ------------------------------------------------------------------------------------
class _DBLoader:
    """Reads batches from a looping database cursor (runs in the prefetch thread)."""

    def __init__(self, cursor, source, transformer, batch_size, dtype):
        self.cursor = cursor
        self.source = source
        self.transformer = transformer
        self.batch_size = batch_size
        self.dtype = dtype
        p = transformer.param
        self.force = (p.force_color, p.force_gray)

    def __call__(self, buffer):
        records = self.cursor.next_records(self.batch_size)
        raw, labels = decode_batch(records, self.source, *self.force)
        buffer = _transformed_batch(self.transformer, raw, labels, buffer, self.dtype)
        buffer.resume = self.position()
        return buffer

    def position(self):
        """Where the next batch starts: its first key and the transformer's generator state."""
        return {"key": self.cursor.key().hex(), "transform_rng": self.transformer.rng.bit_generator.state}

    def seek(self, position):
        self.cursor.seek(bytes.fromhex(position["key"]))
        self.transformer.rng.bit_generator.state = position["transform_rng"]


@register_layer("Data")
class DataLayer(_BaseDataLayer):
    """Batches of Datum records from an LMDB/LevelDB: data (N, C, H, W) and label (N,).

    Records are read in key order and wrap around at the end; `rand_skip` skips a
    random number of records at the start in TRAIN. The next `prefetch` batches are
    prepared in a background thread.
    """

    def layer_setup(self, bottom, top):
        p = self.layer_param.data_param
        self._setup_common(top)
        self.batch_size = self._check_batch_size(p.batch_size, "data_param")
        self._warn_deprecated(p, "data_param")
        if not p.source:
            raise self.error("data_param.source (the database path) is not set")
        self.reader = None
        try:
            self.reader = open_reader(p.source, p.backend)
            key, value = self.reader.first()
            raw, _ = decode_batch([(key, value)], repr(p.source), self.transformer.param.force_color,
                                  self.transformer.param.force_gray)
            shape = self.transformer.output_shape(raw.shape[1:])
        except (DBError, TransformError, ValueError) as exc:
            if getattr(self, "reader", None) is not None:
                self.reader.close()
            raise self.error(str(exc)) from None
        top[0].reshape((self.batch_size,) + shape)
        if self.output_labels:
            top[1].reshape(self.batch_size)
        cursor = self.reader.cursor()
        if self.phase == TRAIN and solver_count() > 1:
            cursor = ShardedCursor(cursor, *shard_bounds_ok())
        if p.rand_skip and self.phase == TRAIN:
            # Different solvers/runs start at different records, as with Caffe's rand_skip.
            cursor.skip(int(_rng.get_rng().integers(p.rand_skip)))
        self._loader = _DBLoader(cursor, repr(p.source), self.transformer, self.batch_size,
                                 self.dtype)
        self._position = self._loader.position()
        self._resources = (cursor, self.reader)
        self._start_prefetch(self._loader, p.prefetch, resources=self._resources)

    def forward(self, bottom, top):
        self._forward_prefetched(top)

    def snapshot_state(self):
        """The next record's key and the transform's random state (saved with snapshots)."""
        return {"source": self.layer_param.data_param.source, **self._position}

    def restore_state(self, state):
        """Continue from `snapshot_state()`'s position: batches already prefetched are dropped."""
        self._seek_prefetched(state, self.layer_param.data_param.prefetch)


# -- ImageData ------------------------------------------------------------------------------
class _ImageLoader:
    """Loads listed image files batch by batch, reshuffling at each pass when asked."""

    def __init__(self, entries, root, param, transformer, batch_size, dtype, rng, start):
        self.entries = entries
        self.root = root
        self.param = param
        self.transformer = transformer
        self.batch_size = batch_size
        self.dtype = dtype
        self.rng = rng
        self.pos = start
        self.listed = list(entries)                  # the list file's order
        self.first_rng = rng.bit_generator.state     # before any shuffle
        self.shuffles = 0

    def path(self, name):
        return self.root + name

    def load(self, index):
        from ..datasets.imageset import load_image
        name = self.entries[index][0]
        p = self.param
        return load_image(self.path(name), p.new_height, p.new_width, p.is_color)

    def __call__(self, buffer):
        images, labels = [], np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            name, labels[i] = self.entries[self.pos]
            img = self.load(self.pos)
            if images and img.shape != images[0].shape:
                raise ValueError(f"image {name!r} is {_fmt(img.shape)} but the batch's first image is "
                                 f"{_fmt(images[0].shape)}; set image_data_param new_height/new_width "
                                 f"to resize them to one size")
            images.append(img)
            self.pos += 1
            if self.pos == len(self.entries):
                self.pos = 0
                if self.param.shuffle:
                    self.shuffle()
        buffer = _transformed_batch(self.transformer, np.stack(images), labels, buffer, self.dtype)
        buffer.resume = self.position()
        return buffer

    def shuffle(self):
        order = self.rng.permutation(len(self.entries))
        self.entries = [self.entries[i] for i in order]
        self.shuffles += 1

    def position(self):
        """The next image and, instead of the (long) shuffled order, how to redo it: the
        generator's first state and the number of shuffles since."""
        return {"pos": self.pos, "count": len(self.listed), "first_rng": self.first_rng,
                "shuffles": self.shuffles, "transform_rng": self.transformer.rng.bit_generator.state}

    def seek(self, position):
        if position["count"] != len(self.listed) or not 0 <= position["pos"] < len(self.listed):
            raise ValueError(f"the saved position is for a list of {position['count']} images, "
                             f"this one has {len(self.listed)}")
        self.entries = list(self.listed)
        self.rng.bit_generator.state = position["first_rng"]
        self.first_rng = position["first_rng"]
        self.shuffles = 0
        for _ in range(int(position["shuffles"])):
            self.shuffle()
        self.pos = int(position["pos"])
        self.transformer.rng.bit_generator.state = position["transform_rng"]


@register_layer("ImageData")
class ImageDataLayer(_BaseDataLayer):
    """Images listed as `path label` lines in `source`: data (N, C, H, W) BGR and label (N,).

    Files are read relative to `root_folder`, optionally resized to new_height x
    new_width, shuffled at each pass with `shuffle`. Needs Pillow.
    """

    exact_num_top = 2
    min_num_top = max_num_top = None

    def layer_setup(self, bottom, top):
        from ..datasets.imageset import ImageError, read_image_list
        p = self.layer_param.image_data_param
        self._setup_common(top)
        self.batch_size = self._check_batch_size(p.batch_size, "image_data_param")
        self._warn_deprecated(p, "image_data_param")
        if (p.new_height == 0) != (p.new_width == 0):
            raise self.error("image_data_param: set new_height and new_width together (or neither)")
        root = p.root_folder
        if root and os.path.isdir(root) and not root.endswith(("/", os.sep)):
            root += os.sep  # Caffe concatenates root_folder + name; spare users the trailing slash
        try:
            entries = read_image_list(p.source)
        except ImageError as exc:
            raise self.error(str(exc)) from None
        entries = _shard(self, entries, f"{p.source!r} lists")
        rng = np.random.default_rng(int(_rng.get_rng().integers(2 ** 63 - 1)))
        loader = _ImageLoader(entries, root, p, self.transformer, self.batch_size, self.dtype, rng, 0)
        if p.shuffle:
            loader.shuffle()
        if p.rand_skip:
            skip = int(_rng.get_rng().integers(p.rand_skip))
            if skip >= len(entries):
                raise self.error(f"rand_skip drew {skip} but {p.source!r} lists only "
                                 f"{len(entries)} images")
            loader.pos = skip
        try:
            first = loader.load(loader.pos)
            shape = self.transformer.output_shape(first.shape)
        except (ImageError, TransformError) as exc:
            raise self.error(str(exc)) from None
        top[0].reshape((self.batch_size,) + shape)
        top[1].reshape(self.batch_size)
        self._loader = loader
        self._position = loader.position()
        self._resources = ()
        self._start_prefetch(loader, self.layer_param.data_param.prefetch)

    def forward(self, bottom, top):
        self._forward_prefetched(top)

    def snapshot_state(self):
        """The next image, the shuffles so far and the transform's random state."""
        return {"source": self.layer_param.image_data_param.source, **self._position}

    def restore_state(self, state):
        self._seek_prefetched(state, self.layer_param.data_param.prefetch)


# -- HDF5Data -------------------------------------------------------------------------------------
def _import_h5py(layer):
    try:
        import h5py
    except ImportError:
        raise layer.error(f"{layer.type} needs h5py: pip install minicaffe[hdf5] "
                          f"(or pip install h5py)") from None
    return h5py


@register_layer("HDF5Data")
class HDF5DataLayer(Layer):
    """Rows of the .h5 files listed in `source`: top i (N, ...) is the dataset named like top i.

    Files are read whole, in list order (or shuffled, with rows shuffled too at
    each pass); batches run across file boundaries. Needs h5py.
    """

    exact_num_bottom = 0
    min_num_top = 1

    def layer_setup(self, bottom, top):
        self.h5py = _import_h5py(self)
        p = self.layer_param.hdf5_data_param
        if self.layer_param.HasField("transform_param"):
            raise self.error("HDF5Data does not transform data; remove transform_param")
        self.dtype = top[0].dtype
        self.batch_size = int(p.batch_size)
        if self.batch_size <= 0:
            raise self.error(f"hdf5_data_param.batch_size must be positive, got {p.batch_size}")
        self.names = list(self.layer_param.top)
        if len(self.names) != len(top):
            raise self.error("HDF5Data reads the datasets named after its tops; give the layer "
                             "one `top:` name per top blob")
        if not os.path.isfile(p.source):
            raise self.error(f"hdf5_data_param.source {p.source!r} not found (it should be a text "
                             f"file listing .h5 files)")
        with open(p.source) as f:
            files = f.read().split()
        if not files:
            raise self.error(f"{p.source!r} lists no HDF5 files")
        base = os.path.dirname(p.source)
        self.files = [f if os.path.exists(f) or not os.path.exists(os.path.join(base, f))
                      else os.path.join(base, f) for f in files]
        self.rng = np.random.default_rng(int(_rng.get_rng().integers(2 ** 63 - 1)))
        self.shuffle = bool(p.shuffle)
        self.file_order = self.rng.permutation(len(self.files)) if self.shuffle else np.arange(len(self.files))
        self.file_pos = 0
        self._load(self.files[self.file_order[0]])
        self.row_shapes = [a.shape[1:] for a in self.arrays]
        for t, a in zip(top, self.arrays):
            t.reshape((self.batch_size,) + a.shape[1:])

    def _load(self, path):
        h5py = self.h5py
        try:
            with h5py.File(path, "r") as f:
                arrays = []
                for name in self.names:
                    if name not in f:
                        raise self.error(f"HDF5 file {path!r} has no dataset {name!r} "
                                         f"(it has: {', '.join(sorted(f.keys())) or 'none'})")
                    ds = f[name]
                    if ds.dtype.kind not in "iuf" or ds.ndim < 1:
                        raise self.error(f"dataset {name!r} in {path!r} has type {ds.dtype} and "
                                         f"{ds.ndim} axes; need a numeric array with at least 1 axis")
                    arrays.append(np.asarray(ds[...], dtype=self.dtype))
        except OSError as exc:
            raise self.error(f"failed to open HDF5 file {path!r}: {exc}") from None
        n = arrays[0].shape[0]
        for name, a in zip(self.names, arrays):
            if a.shape[0] != n:
                raise self.error(f"datasets in {path!r} differ in length: {self.names[0]!r} has {n} "
                                 f"rows, {name!r} has {a.shape[0]}")
            if n == 0:
                raise self.error(f"dataset {name!r} in {path!r} is empty")
        if hasattr(self, "row_shapes"):
            for name, a, shape in zip(self.names, arrays, self.row_shapes):
                if a.shape[1:] != shape:
                    raise self.error(f"dataset {name!r} in {path!r} has rows of shape {a.shape[1:]} "
                                     f"but the first file's are {shape}")
        self.arrays = arrays
        self._rows_rng = self.rng.bit_generator.state   # to redraw this file's order on resume
        self.rows = _shard(self, np.arange(n), f"HDF5 file {path!r} has")
        if self.shuffle:
            self.rows = self.rng.permutation(self.rows)
        self.row_pos = 0

    def _next_file(self):
        if len(self.files) > 1:
            self.file_pos += 1
            if self.file_pos == len(self.files):
                self.file_pos = 0
                if self.shuffle:
                    self.file_order = self.rng.permutation(len(self.files))
            self._load(self.files[self.file_order[self.file_pos]])
        else:
            self.row_pos = 0
            if self.shuffle:
                self._rows_rng = self.rng.bit_generator.state
                # From the sorted share, as _load draws it, so a resume redraws the same order.
                self.rows = self.rng.permutation(np.sort(self.rows))

    def snapshot_state(self):
        """The current file and row, the file order, and the generator states from which the
        current file's row order is redrawn (rather than saving a long permutation)."""
        return {"files": len(self.files), "file_pos": self.file_pos,
                "file_order": [int(i) for i in self.file_order], "row_pos": self.row_pos,
                "rows_rng": self._rows_rng, "rng": self.rng.bit_generator.state}

    def restore_state(self, state):
        try:
            if state["files"] != len(self.files):
                raise ValueError(f"the saved position is for {state['files']} files, "
                                 f"{self.layer_param.hdf5_data_param.source!r} lists {len(self.files)}")
            file_order = np.asarray(state["file_order"], dtype=np.int64)
            path = self.files[file_order[int(state["file_pos"])]]
            self.rng.bit_generator.state = state["rows_rng"]
            self._load(path)
            if not 0 <= int(state["row_pos"]) < len(self.rows):
                raise ValueError(f"row {state['row_pos']} is past the end of {path!r}")
            self.file_order, self.file_pos = file_order, int(state["file_pos"])
            self.row_pos = int(state["row_pos"])
            self.rng.bit_generator.state = state["rng"]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            message = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise self.error(f"cannot resume from the saved position: {message}") from None

    def reshape(self, bottom, top):
        for t, shape in zip(top, self.row_shapes):
            t.reshape((self.batch_size,) + shape)

    def forward(self, bottom, top):
        filled = 0
        while filled < self.batch_size:
            # Take as many rows as the current file still has, in one slice.
            take = min(self.batch_size - filled, len(self.rows) - self.row_pos)
            rows = self.rows[self.row_pos:self.row_pos + take]
            for t, a in zip(top, self.arrays):
                np.take(a, rows, axis=0, out=t.data[filled:filled + take])
            filled += take
            self.row_pos += take
            if self.row_pos == len(self.rows):
                self._next_file()

    def backward(self, top, propagate_down, bottom):
        pass


# -- MemoryData ---------------------------------------------------------------------------------
@register_layer("MemoryData")
class MemoryDataLayer(_BaseDataLayer):
    """Batches from arrays given with `set_input_arrays(data, labels)`: data (N, C, H, W), label.

    Each forward serves the next batch_size rows, wrapping around. Arrays are used
    as given (no transform); `add_datum_vector` transforms Datums first.
    """

    exact_num_top = 2
    min_num_top = max_num_top = None

    def layer_setup(self, bottom, top):
        p = self.layer_param.memory_data_param
        self._setup_common(top)
        self.batch_size = int(p.batch_size)
        self.channels, self.height, self.width = int(p.channels), int(p.height), int(p.width)
        if self.batch_size * self.channels * self.height * self.width <= 0:
            raise self.error("memory_data_param: batch_size, channels, height and width must all be "
                             "set and positive")
        top[0].reshape(self.batch_size, self.channels, self.height, self.width)
        top[1].reshape(self.batch_size)
        self.data_array = None
        self.label_array = None
        self.pos = 0
        self.has_new_data = False

    def set_input_arrays(self, data, labels):
        """Serve batches from data (N, C, H, W) and labels (N,) or (N, 1, 1, 1); N a multiple of batch_size.

        Like pycaffe, arrays already of the net's dtype and C-contiguous are used
        without copying, so later changes to them show in the next batches.
        """
        data = np.ascontiguousarray(data, dtype=self.dtype)
        labels = np.ascontiguousarray(labels, dtype=self.dtype)
        if labels.ndim == 4 and labels.shape[1:] == (1, 1, 1):
            labels = labels.reshape(-1)
        shape = (self.channels, self.height, self.width)
        if data.ndim != 4 or data.shape[1:] != shape:
            raise self.error(f"set_input_arrays: data must have shape (N, {', '.join(map(str, shape))}), "
                             f"got {data.shape}")
        if labels.ndim != 1:
            raise self.error(f"set_input_arrays: labels must have shape (N,) or (N, 1, 1, 1), got {labels.shape}")
        if len(data) != len(labels):
            raise self.error(f"set_input_arrays: data and labels must have the same first dimension, "
                             f"got {len(data)} and {len(labels)}")
        self.reset(data, labels)

    def reset(self, data, labels):
        data = _shard(self, data, "the input arrays have")
        labels = _shard(self, labels, "the input arrays have")
        n = len(data)
        if n == 0 or n % self.batch_size:
            raise self.error(f"the number of input rows ({n}) must be a positive multiple of "
                             f"batch_size ({self.batch_size})")
        if self.layer_param.HasField("transform_param"):
            warnings.warn(f"layer {self.name!r}: MemoryData does not transform arrays given with "
                          f"set_input_arrays", stacklevel=3)
        self.data_array, self.label_array, self.pos = data, labels, 0

    def add_datum_vector(self, datums):
        """Transform a list of Datums (per transform_param) and serve them as the input arrays."""
        if self.has_new_data:
            raise self.error("cannot add data until the current data has been consumed")
        from ..db import datum_to_array
        if not datums:
            raise self.error("add_datum_vector: no Datum to add")
        if len(datums) % self.batch_size:
            raise self.error(f"add_datum_vector: {len(datums)} Datums is not a multiple of "
                             f"batch_size ({self.batch_size})")
        raw = np.stack([datum_to_array(d) for d in datums])
        try:
            data = self.transformer.transform(raw)
        except TransformError as exc:
            raise self.error(str(exc)) from None
        if data.shape[1:] != (self.channels, self.height, self.width):
            raise self.error(f"transformed Datums are {_fmt(data.shape[1:])}, the layer expects "
                             f"{self.channels}x{self.height}x{self.width}")
        labels = np.array([d.label for d in datums], dtype=self.dtype)
        self.data_array, self.label_array, self.pos = data, labels, 0
        self.has_new_data = True

    def set_batch_size(self, batch_size):
        if self.has_new_data:
            raise self.error("cannot change batch_size until the current data has been consumed")
        self.batch_size = int(batch_size)

    def forward(self, bottom, top):
        if self.data_array is None:
            raise self.error("no input: call set_input_arrays(data, labels) (net.set_input_arrays) "
                             "before forward")
        b, pos = self.batch_size, self.pos
        top[0].reshape(b, self.channels, self.height, self.width)
        top[0].data[...] = self.data_array[pos:pos + b]
        # Caffe gives the label top shape (N,) at setup but (N, 1, 1, 1) from forward on.
        top[1].reshape(b, 1, 1, 1)
        top[1].data[...] = self.label_array[pos:pos + b].reshape(b, 1, 1, 1)
        self.pos = (pos + b) % len(self.data_array)
        if self.pos == 0:
            self.has_new_data = False


def _shard(layer, items, what):
    """This rank's share (every solver_count()-th item from solver_rank()) in TRAIN, as each of
    Caffe's multi-solver data layers reads only its own records; `items` whole otherwise."""
    if layer.phase != TRAIN or solver_count() == 1:
        return items
    rank, count = shard_bounds_ok()
    if len(items) < count:
        raise layer.error(f"{what} {len(items)} records, fewer than the {count} data-parallel "
                          f"solvers reading them")
    return items[rank::count]


def _fmt(shape):
    return "x".join(str(d) for d in shape)
