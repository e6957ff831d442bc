"""Key-value databases of serialized `Datum` records, Caffe's dataset format.

Caffe stores a dataset as an LMDB (or LevelDB) whose values are `Datum` protos:
channels, height, width, the pixels as uint8 bytes in `data` (or as floats in
`float_data`), and an integer `label`. Keys only fix the order (`%08d`).

    with open_writer("train_lmdb") as db:          # write
        db.put(b"00000000", array_to_datum(img, label).SerializeToString())
    reader = open_reader("train_lmdb")               # read, looping forever
    cursor = reader.cursor()
    records = cursor.next_records(64)                # [(key, value), ...]
    images, labels = decode_batch(records)           # (64, C, H, W) uint8, (64,)

LMDB comes with the `lmdb` package (a core dependency); LevelDB needs the
optional `plyvel` package (`pip install plyvel`).
"""
import os
import struct
import threading

import numpy as np

from .errors import MinicaffeError
from .proto import caffe_pb2

__all__ = ["DBError", "open_reader", "open_writer", "backend_name", "array_to_datum",
           "datum_to_array", "decode_batch", "parse_datum", "check_lmdb_file", "LMDB_MAP_SIZE"]

# Start small and double on demand: LMDB maps the whole size into virtual memory.
LMDB_MAP_SIZE = 1 << 30


class DBError(MinicaffeError, ValueError):
    """A dataset database that is missing, corrupt or holds unexpected records."""


def backend_name(backend):
    """'lmdb' or 'leveldb' from a DataParameter.DB enum value or a string."""
    if isinstance(backend, str):
        name = backend.lower()
    elif backend == caffe_pb2.DataParameter.LMDB:
        name = "lmdb"
    elif backend == caffe_pb2.DataParameter.LEVELDB:
        name = "leveldb"
    else:
        name = str(backend)
    if name not in ("lmdb", "leveldb"):
        raise DBError(f"unknown database backend {backend!r}; use lmdb or leveldb")
    return name


def _import_plyvel():
    try:
        import plyvel
    except ImportError:
        raise DBError("LevelDB databases need the optional plyvel package: pip install plyvel "
                      "(or convert the data to LMDB and set `backend: LMDB`)") from None
    return plyvel


def _looks_like_lmdb(path):
    return os.path.isfile(os.path.join(path, "data.mdb"))


# -- reading -------------------------------------------------------------------
def open_reader(path, backend="lmdb"):
    """An LMDBReader or LevelDBReader for an existing database at `path`."""
    backend = backend_name(backend)
    path = os.fspath(path)
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise DBError(f"{backend.upper()} database {path!r} does not exist{where}")
    if backend == "leveldb":
        if _looks_like_lmdb(path):
            raise DBError(f"{path!r} is an LMDB but the backend is LEVELDB (Caffe's default); "
                          f"add `backend: LMDB` to data_param")
        return LevelDBReader(path)
    return LMDBReader(path)


# LMDB allows one open environment per database file and process, so readers of
# the same file (a train and a test net, or a net built twice) share it.
_shared_envs = {}  # (st_dev, st_ino) of the data file -> [Environment, number of users]
_shared_envs_lock = threading.Lock()


# The two meta pages at the start of an LMDB data file (lmdb's MDB_meta, 64-bit layout):
# page header 16 bytes, then magic u32, version u32, address u64, map size u64, two MDB_db
# records of 48 bytes (the first one's md_pad holds the page size), last page number u64,
# transaction id u64.
_LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<16xII8xQI92xQQ")


def check_lmdb_file(data_path):
    """Raise DBError unless the LMDB data file is as long as its newest meta page says.

    LMDB maps the file into memory; reading a page past the end of a truncated file
    kills the process with SIGBUS, so truncation must be caught before the mapping.
    """
    try:
        size = os.path.getsize(data_path)
        with open(data_path, "rb") as f:
            first = f.read(_META.size)
            if len(first) < _META.size:
                if size == 0:
                    return  # lmdb says MDB_INVALID for an empty file
                raise DBError(f"LMDB data file {data_path!r} is truncated: {size} bytes, shorter "
                              f"than its header")
            magic, _, _, page_size, last_pg, txnid = _META.unpack(first)
            if magic != _LMDB_MAGIC or page_size < 512 or page_size & (page_size - 1):
                return  # not a meta page we know: lmdb itself reports what is wrong (MDB_INVALID)
            f.seek(page_size)
            second = f.read(_META.size)
    except OSError as exc:
        raise DBError(f"cannot read LMDB data file {data_path!r}: {exc.strerror or exc}") from None
    metas = [(txnid, last_pg)]
    if len(second) == _META.size:
        magic2, _, _, _, last_pg2, txnid2 = _META.unpack(second)
        if magic2 == _LMDB_MAGIC:
            metas.append((txnid2, last_pg2))
    _, last_pg = max(metas)
    need = (last_pg + 1) * page_size
    if size < need:
        raise DBError(f"LMDB data file {data_path!r} is truncated: {size} bytes, but its header "
                      f"says the data runs to page {last_pg} ({need} bytes); copy the database "
                      f"again or rebuild it")


def _acquire_lmdb(path):
    import lmdb
    subdir = os.path.isdir(path)
    data_file = os.path.join(path, "data.mdb") if subdir else path
    if os.path.isfile(data_file):
        check_lmdb_file(data_file)
    try:
        st = os.stat(os.path.join(path, "data.mdb") if subdir else path)
        key = (st.st_dev, st.st_ino)
    except OSError:
        key = None  # let lmdb report what is wrong
    with _shared_envs_lock:
        if key in _shared_envs:
            entry = _shared_envs[key]
            entry[1] += 1
            return key, entry[0]
        try:
            # lock=False: readers never block writers and need no write access to the folder.
            env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=subdir)
        except lmdb.Error as exc:
            reason = str(exc)
            if reason.startswith(path + ": "):
                reason = reason[len(path) + 2:]
            raise DBError(f"cannot open LMDB {path!r}: {reason}") from None
        _shared_envs[key] = [env, 1]
        return key, env


def _release_lmdb(key):
    with _shared_envs_lock:
        entry = _shared_envs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _shared_envs[key]
            entry[0].close()


class LMDBReader:
    """Read-only LMDB: `len()`, `first()`, and looping cursors."""

    def __init__(self, path):
        import lmdb
        self.path = path
        self._key, self.env = _acquire_lmdb(path)
        self._lmdb = lmdb
        self._open = True

    def __len__(self):
        return self.env.stat()["entries"]

    def first(self):
        """(key, value) of the first record; an error if the database is empty."""
        try:
            with self.env.begin(buffers=False) as txn:
                cur = txn.cursor()
                if not cur.first():
                    raise DBError(f"LMDB {self.path!r} is empty")
                return cur.key(), cur.value()
        except self._lmdb.Error as exc:
            raise DBError(f"cannot read LMDB {self.path!r}: {exc}") from None

    def cursor(self):
        return _LMDBCursor(self)

    def iter_records(self):
        """Every (key, value) once, in key order."""
        with self.env.begin(buffers=False) as txn:
            yield from txn.cursor()

    def close(self):
        if self._open:
            self._open = False
            _release_lmdb(self._key)


class _LMDBCursor:
    """Walks the records in key order and wraps around to the first at the end."""

    def __init__(self, reader):
        self.reader = reader
        self.txn = reader.env.begin(buffers=False)
        self.cur = self.txn.cursor()
        if not self.cur.first():
            raise DBError(f"LMDB {reader.path!r} is empty")

    def skip(self, n):
        for _ in range(n):
            self._advance()

    def key(self):
        """The key of the record the next `next_records` call starts with."""
        return self.cur.key()

    def seek(self, key):
        """Continue from the record with this key (from `key()`, maybe of an earlier run)."""
        here = self.cur.key()
        if not self.cur.set_key(key):
            if not self.cur.set_key(here):   # a failed lookup leaves the cursor nowhere
                self.cur.first()
            raise DBError(f"LMDB {self.reader.path!r} has no record with key {key!r} to resume "
                          f"from; was the database changed since the snapshot?")

    def _advance(self):
        if not self.cur.next():
            self.cur.first()

    def next_records(self, n):
        """The next n (key, value) pairs, wrapping around as often as needed."""
        out = []
        try:
            for _ in range(n):
                out.append(self.cur.item())
                self._advance()
        except self.reader._lmdb.Error as exc:
            raise DBError(f"cannot read LMDB {self.reader.path!r}: {exc}") from None
        return out

    def close(self):
        try:
            self.txn.abort()
        except self.reader._lmdb.Error:
            pass  # already gone with its environment


class LevelDBReader:
    """Read-only LevelDB through plyvel, with the same interface as LMDBReader."""

    def __init__(self, path):
        plyvel = _import_plyvel()
        self.path = path
        try:
            self.db = plyvel.DB(path, create_if_missing=False)
        except plyvel.Error as exc:
            raise DBError(f"cannot open LevelDB {path!r}: {exc}") from None

    def __len__(self):
        return sum(1 for _ in self.db.iterator(include_value=False))

    def first(self):
        for item in self.db.iterator():
            return item
        raise DBError(f"LevelDB {self.path!r} is empty")

    def cursor(self):
        return _LevelDBCursor(self)

    def iter_records(self):
        yield from self.db.iterator()

    def close(self):
        self.db.close()


class _LevelDBCursor:
    def __init__(self, reader):
        self.reader = reader
        self.snapshot = reader.db.snapshot()
        self._restart()

    def _restart(self):
        self.it = self.snapshot.iterator()
        self.item = next(self.it, None)
        if self.item is None:
            raise DBError(f"LevelDB {self.reader.path!r} is empty")

    def _advance(self):
        self.item = next(self.it, None)
        if self.item is None:
            self._restart()

    def skip(self, n):
        for _ in range(n):
            self._advance()

    def key(self):
        return self.item[0]

    def seek(self, key):
        self.it.close()
        self.it = self.snapshot.iterator(start=key)
        self.item = next(self.it, None)
        if self.item is None or self.item[0] != key:
            self._restart()
            raise DBError(f"LevelDB {self.reader.path!r} has no record with key {key!r} to resume "
                          f"from; was the database changed since the snapshot?")

    def next_records(self, n):
        out = []
        for _ in range(n):
            out.append(self.item)
            self._advance()
        return out

    def close(self):
        self.it.close()


class ShardedCursor:
    """Every `count`-th record of a looping cursor from record `rank` on (Caffe's DataLayer::Skip
    for multi-solver training): `count` such cursors read disjoint shares of every epoch."""

    def __init__(self, cursor, rank, count):
        self.cursor = cursor
        self.rank = rank
        self.count = count
        cursor.skip(rank)

    def skip(self, n):
        self.cursor.skip(n * self.count)

    def key(self):
        """The key of this shard's next record (a saved position)."""
        return self.cursor.key()

    def seek(self, key):
        """Continue from a key rank 0's key() returned: every rank has read as many records of
        its share, so this rank's next record is `rank` records further."""
        self.cursor.seek(key)
        self.cursor.skip(self.rank)

    def next_records(self, n):
        out = []
        for _ in range(n):
            out.extend(self.cursor.next_records(1))
            self.cursor.skip(self.count - 1)
        return out

    def close(self):
        self.cursor.close()


# -- writing -------------------------------------------------------------------
def open_writer(path, backend="lmdb", overwrite=False):
    """A new database at `path` (an error if it exists, unless overwrite)."""
    backend = backend_name(backend)
    path = os.fspath(path)
    if os.path.exists(path):
        if not overwrite:
            raise DBError(f"{path!r} already exists; remove it first (Caffe's tools refuse "
                          f"to write into an existing database)")
        import shutil
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if backend == "leveldb":
        return LevelDBWriter(path)
    return LMDBWriter(path)


class _BatchedWriter:
    """Collects puts and writes them `commit_every` at a time; subclasses store a batch."""

    def __init__(self, path, commit_every):
        self.path = path
        self.commit_every = commit_every
        self.pending = []
        self.count = 0

    def put(self, key, value):
        if isinstance(key, str):
            key = key.encode()
        self.pending.append((key, value))
        if len(self.pending) >= self.commit_every:
            self.commit()

    def commit(self):
        if self.pending:
            self._write(self.pending)
            self.count += len(self.pending)
            self.pending = []

    def close(self):
        self.commit()
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LMDBWriter(_BatchedWriter):
    def __init__(self, path, commit_every=1000, map_size=LMDB_MAP_SIZE):
        import lmdb
        super().__init__(path, commit_every)
        self._lmdb = lmdb
        os.makedirs(path)
        # Flush to disk once at close rather than at every commit.
        self.env = lmdb.open(path, map_size=map_size, subdir=True, sync=False)

    def _write(self, items):
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.cursor().putmulti(items)
                return
            except self._lmdb.MapFullError:
                # The aborted transaction left nothing behind; retry in a bigger map.
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _close(self):
        self.env.sync(True)
        self.env.close()


class LevelDBWriter(_BatchedWriter):
    def __init__(self, path, commit_every=1000):
        plyvel = _import_plyvel()
        super().__init__(path, commit_every)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as LMDBWriter does
        self.db = plyvel.DB(path, create_if_missing=True, error_if_exists=True)

    def _write(self, items):
        with self.db.write_batch() as batch:
            for key, value in items:
                batch.put(key, value)

    def _close(self):
        self.db.close()


# -- Datum <-> numpy ---------------------------------------------------------------
def array_to_datum(array, label=None):
    """A Datum from a (C, H, W) array: uint8 goes to `data`, anything else to `float_data`.

    label=None leaves the label field unset (absent from the serialized record), as pycaffe does.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"a Datum holds a (channels, height, width) array, got shape {array.shape}")
    datum = caffe_pb2.Datum(channels=array.shape[0], height=array.shape[1], width=array.shape[2])
    if array.dtype == np.uint8:
        datum.data = array.tobytes()
    else:
        datum.float_data.extend(array.astype(np.float32).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def parse_datum(value, key=None, source=None):
    """Deserialize one Datum, with an error naming the record when it is not one."""
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except Exception:
        raise DBError(f"record {_name(key)} of {source or 'the database'} is not a serialized "
                      f"Datum (corrupt database?)") from None
    return datum


def datum_to_array(datum, force_color=False, force_gray=False):
    """The (C, H, W) array of a Datum: uint8 for byte data, float32 for float_data.

    Encoded Datums (a PNG/JPEG file in `data`) are decoded with Pillow, in BGR order.
    """
    if datum.encoded:
        from .image_codec import decode_image
        return decode_image(datum.data, force_color=force_color, force_gray=force_gray)
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        array = np.frombuffer(datum.data, dtype=np.uint8)
    else:
        array = np.asarray(datum.float_data, dtype=np.float32)
    if array.size != shape[0] * shape[1] * shape[2]:
        raise DBError(f"Datum says {shape[0]}x{shape[1]}x{shape[2]} but holds {array.size} values")
    return array.reshape(shape)


def _name(key):
    if key is None:
        return "?"
    return repr(key.decode(errors="replace") if isinstance(key, bytes) else key)


def decode_batch(records, source=None, force_color=False, force_gray=False):
    """(N, C, H, W) array and (N,) int labels from (key, serialized Datum) pairs.

    All records must have the first one's size (as Caffe checks per batch). The
    result is uint8 when every record stores bytes, float32 otherwise.
    """
    datums = [parse_datum(value, key, source) for key, value in records]
    first = datums[0]
    labels = np.fromiter((d.label for d in datums), dtype=np.int64, count=len(datums))
    if not first.encoded and all(len(d.data) for d in datums):
        # The common case: join the raw bytes and reinterpret them in one go.
        shape = (first.channels, first.height, first.width)
        size = shape[0] * shape[1] * shape[2]
        for (key, _), d in zip(records, datums):
            if (d.channels, d.height, d.width) != shape or len(d.data) != size:
                _size_error(key, d, records[0][0], shape, source)
        if size <= 0:
            raise DBError(f"record {_name(records[0][0])} of {source or 'the database'} has "
                          f"shape {shape}; channels, height and width must be positive")
        data = np.frombuffer(b"".join(d.data for d in datums), dtype=np.uint8)
        return data.reshape((len(datums),) + shape), labels
    arrays = []
    for (key, _), d in zip(records, datums):
        try:
            arrays.append(datum_to_array(d, force_color, force_gray))
        except DBError as exc:
            raise DBError(f"record {_name(key)} of {source or 'the database'}: {exc}") from None
    shape = arrays[0].shape
    for (key, _), d, a in zip(records, datums, arrays):
        if a.shape != shape:
            _size_error(key, d, records[0][0], shape, source, a.shape)
    if any(a.dtype != np.uint8 for a in arrays):
        return np.stack([a.astype(np.float32, copy=False) for a in arrays]), labels
    return np.stack(arrays), labels


def _size_error(key, datum, first_key, shape, source, actual=None):
    actual = actual or (datum.channels, datum.height, datum.width)
    n = len(datum.data) or len(datum.float_data)
    raise DBError(f"record {_name(key)} of {source or 'the database'} is "
                  f"{'x'.join(map(str, actual))} ({n} values) but record {_name(first_key)} "
                  f"is {'x'.join(map(str, shape))}; all Datums in a batch must have one size")
