"""Write small CIFAR folders and archives in the official format, for tests and examples.

    from fastres.testing import synthetic, write_cifar
    d = synthetic(512, 128, seed=0)                  # learnable random images, a CifarData
    write_cifar("data", "cifar10", train=(d.train.images, d.train.labels),
                test=(d.test.images, d.test.labels))   # data/cifar-10-batches-py/...
    data = fastres.data.load_cifar("data")            # read back like the real thing

`write_cifar` writes the files as Krizhevsky's Python 2 did (protocol-2 pickles with Python 2
string keys, arrays through numpy 1.x's reconstructor), so code under test meets the real
on-disk format, folder or `.tar.gz`, not a Python 3 imitation of it. `synthetic` makes data
that a small CNN learns in an epoch or two, for smoke runs and demos. Nothing here is needed
to train on real data; `fastres.data` reads, this module writes.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from fastres.data import (CIFAR10_CLASSES, CIFAR100_CLASSES, CIFAR100_COARSE_CLASSES,
                          IMAGE_SHAPE, CifarData, Split, _layout, _ROW)

__all__ = ["synthetic", "write_cifar", "synthetic_dir"]


class _Py2Pickler:
    """Protocol-2 pickles as Python 2's cPickle wrote the official files.

    Strings go out as Python 2 `str` (SHORT_BINSTRING / BINSTRING), which Python 3 loads as
    str under encoding='latin1' and as bytes under encoding='bytes'; arrays go out through
    `numpy.core.multiarray._reconstruct` with their bytes as one string, as numpy 1.x did,
    so the files load in numpy 1 and 2 alike. Python 3's own pickler would write unicode
    keys and `_codecs.encode` calls instead, which is not what readers of the real files
    meet. Handles the types CIFAR files hold: dict, list, tuple, str, bytes, int, None, bool,
    and numeric numpy arrays."""

    def __init__(self):
        self._buf = io.BytesIO()
        self._w = self._buf.write

    def dumps(self, obj) -> bytes:
        self._w(pickle.PROTO + b"\x02")
        self._save(obj)
        self._w(pickle.STOP)
        return self._buf.getvalue()

    def _str(self, s) -> None:
        b = s.encode("latin1") if isinstance(s, str) else bytes(s)
        if len(b) < 256:
            self._w(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self._w(pickle.BINSTRING + struct.pack("<i", len(b)) + b)

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self._w(pickle.BININT1 + bytes([v]))
        elif 0 <= v < 65536:
            self._w(pickle.BININT2 + struct.pack("<H", v))
        elif -2**31 <= v < 2**31:
            self._w(pickle.BININT + struct.pack("<i", v))
        else:
            raise ValueError(f"integer {v} does not fit a CIFAR file")

    def _global(self, module: str, name: str) -> None:
        self._w(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def _save(self, o) -> None:
        if o is None:
            self._w(pickle.NONE)
        elif isinstance(o, bool):
            self._w(pickle.NEWTRUE if o else pickle.NEWFALSE)
        elif isinstance(o, (int, np.integer)):
            self._int(int(o))
        elif isinstance(o, (str, bytes)):
            self._str(o)
        elif isinstance(o, list):
            self._w(pickle.EMPTY_LIST)
            for k in range(0, len(o), 1000):   # appended in batches of 1000, like cPickle
                self._w(pickle.MARK)
                for e in o[k:k + 1000]:
                    self._save(e)
                self._w(pickle.APPENDS)
        elif isinstance(o, tuple):
            if len(o) <= 3:
                for e in o:
                    self._save(e)
                self._w((pickle.EMPTY_TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3)[len(o)])
            else:
                self._w(pickle.MARK)
                for e in o:
                    self._save(e)
                self._w(pickle.TUPLE)
        elif isinstance(o, dict):
            self._w(pickle.EMPTY_DICT + pickle.MARK)
            for k, v in o.items():
                self._save(k)
                self._save(v)
            self._w(pickle.SETITEMS)
        elif isinstance(o, np.ndarray):
            self._array(o)
        else:
            raise TypeError(f"cannot write {type(o).__name__} to a CIFAR pickle")

    def _array(self, a: np.ndarray) -> None:
        if a.dtype.kind not in "biuf" or a.dtype.byteorder == ">":
            raise TypeError(f"cannot write a {a.dtype} array to a CIFAR pickle")
        a = np.ascontiguousarray(a)
        # _reconstruct(ndarray, (0,), 'b'), then BUILD with (version, shape, dtype, fortran, data)
        self._global("numpy.core.multiarray", "_reconstruct")
        self._global("numpy", "ndarray")
        self._save((0,))
        self._str("b")
        self._w(pickle.TUPLE3 + pickle.REDUCE)
        self._w(pickle.MARK)
        self._int(1)
        self._save(tuple(int(d) for d in a.shape))
        # dtype(kind+size, 0, 1), then BUILD with (3, byteorder, None, None, None, -1, -1, 0)
        self._global("numpy", "dtype")
        self._str(a.dtype.str[1:])
        self._int(0)
        self._int(1)
        self._w(pickle.TUPLE3 + pickle.REDUCE)
        self._save((3, "|" if a.dtype.itemsize == 1 else "<", None, None, None, -1, -1, 0))
        self._w(pickle.BUILD)
        self._w(pickle.NEWFALSE)
        self._str(a.tobytes())
        self._w(pickle.TUPLE + pickle.BUILD)


def _dump_py2(obj) -> bytes:
    return _Py2Pickler().dumps(obj)


def _check_split(arg, what: str, k: int, kc: int | None):
    if not isinstance(arg, (tuple, list)) or len(arg) not in (2, 3):
        raise ValueError(f"{what} must be (images, labels) or, for CIFAR-100, "
                         f"(images, fine_labels, coarse_labels)")
    images = np.asarray(arg[0])
    labels = np.asarray(arg[1]).astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{what} images must be (N, 32, 32, 3) uint8, got {images.shape} {images.dtype}")
    if labels.shape != (len(images),):
        raise ValueError(f"{what} has {len(images)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"{what} labels must be in 0..{k - 1}")
    coarse = None
    if len(arg) == 3:
        if kc is None:
            raise ValueError(f"{what}: coarse labels exist only in CIFAR-100")
        coarse = np.asarray(arg[2]).astype(np.int64)
        if coarse.shape != labels.shape or (len(coarse) and (coarse.min() < 0 or coarse.max() >= kc)):
            raise ValueError(f"{what} coarse labels must be (N,) in 0..{kc - 1}")
    elif kc is not None:
        coarse = labels * kc // k   # a stand-in grouping; the official fine->coarse map is not kept
    return images, labels, coarse


def _what_is_there(target: Path) -> str:
    """What an existing data folder or archive holds, in a few words, for the refusal."""
    from fastres.data import ARCHIVE_MD5, OFFICIAL_MD5, _md5_file

    if target.is_file():
        size = target.stat().st_size
        official = _md5_file(target) in ARCHIVE_MD5.values()
        return (f"{'the official archive' if official else 'an archive'}, "
                f"{size / 2**20:.1f} MiB")
    files = sorted(p for p in target.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in files)
    known = {name: md5 for table in OFFICIAL_MD5.values() for name, md5 in table.items()}
    official = files and all(p.name in known and _md5_file(p) == known[p.name] for p in files)
    names = ", ".join(p.name for p in files[:3]) + (", ..." if len(files) > 3 else "")
    return (f"{'the official data set: ' if official else ''}{len(files)} file"
            f"{'s' if len(files) != 1 else ''}, {size / 2**20:.1f} MiB ({names})")


def _atomic_write(path: Path, blob: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def write_cifar(root, dataset: str = "cifar10", train=None, test=None, *, archive: bool = False,
                classes: Sequence[str] | None = None,
                coarse_classes: Sequence[str] | None = None, overwrite: bool = False) -> Path:
    """Write a data set in the official on-disk format under `root`; return the folder
    (`root/cifar-10-batches-py`) or, with `archive=True`, the archive
    (`root/cifar-10-python.tar.gz`, members under the same folder name, nothing extracted).

    train/test: (images (N, 32, 32, 3) uint8 NHWC, labels (N,)); for CIFAR-100 optionally
    (images, fine_labels, coarse_labels). CIFAR-10 training data is split over data_batch_1..5
    as in the original (sizes differ by at most one). classes default to the official names.

    Data already there (the folder holding files, or the archive) is never replaced unless
    `overwrite=True`: an `OutputError` names it and what it holds (the real CIFAR-10 in
    `data/` is one call away from a test's 512 synthetic images otherwise). Each file is
    written to a temporary name and renamed, so a folder never holds a half-written file.
    """
    from fastres.errors import OutputError

    lay = _layout(dataset)
    root = Path(root)
    target = root / (lay.archive if archive else lay.folder)
    if not overwrite and (target.is_file() or (target.is_dir() and any(target.iterdir()))):
        raise OutputError(f"{target} already holds {_what_is_there(target)}; write_cifar "
                          "never replaces data: pass overwrite=True to replace it, or write "
                          "under another root")
    if train is None or test is None:
        raise ValueError("write_cifar needs train=(images, labels) and test=(images, labels)")
    classes = list(classes or (CIFAR10_CLASSES if lay.name == "cifar10" else CIFAR100_CLASSES))
    kc = None
    if lay.coarse_class_key:
        coarse_classes = list(coarse_classes or CIFAR100_COARSE_CLASSES)
        kc = len(coarse_classes)
    tr = _check_split(train, "train", len(classes), kc)
    te = _check_split(test, "test", len(classes), kc)

    def batch(images, labels, coarse, label, offset):
        d = {"batch_label": label, lay.label_key: [int(v) for v in labels]}
        if coarse is not None:
            d[lay.coarse_label_key] = [int(v) for v in coarse]
        # rows: R plane, G plane, B plane of each image (NHWC -> NCHW, flattened)
        d["data"] = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), _ROW)
        d["filenames"] = [f"image_{offset + i:06d}.png" for i in range(len(images))]
        return d

    files: dict[str, bytes] = {}
    if lay.name == "cifar10":
        files["batches.meta"] = _dump_py2({"num_cases_per_batch": -(-len(tr[0]) // 5),
                                           "label_names": classes, "num_vis": _ROW})
        parts = np.array_split(np.arange(len(tr[0])), len(lay.train_files))
        for i, (name, idx) in enumerate(zip(lay.train_files, parts)):
            files[name] = _dump_py2(batch(tr[0][idx], tr[1][idx], None,
                                          f"training batch {i + 1} of 5", int(idx[0]) if len(idx) else 0))
        files["test_batch"] = _dump_py2(batch(*te, "testing batch 1 of 1", 0))
    else:
        files["meta"] = _dump_py2({"fine_label_names": classes, "coarse_label_names": coarse_classes})
        files["train"] = _dump_py2(batch(*tr, "training batch 1 of 1", 0))
        files["test"] = _dump_py2(batch(*te, "testing batch 1 of 1", 0))

    root.mkdir(parents=True, exist_ok=True)
    if archive:
        dest = root / lay.archive
        tmp = dest.with_name(dest.name + ".part")
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            d = tarfile.TarInfo(lay.folder)
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(d)
            for name, blob in files.items():
                info = tarfile.TarInfo(f"{lay.folder}/{name}")
                info.size, info.mode, info.mtime = len(blob), 0o644, d.mtime
                tar.addfile(info, io.BytesIO(blob))
        os.replace(tmp, dest)
        return dest
    folder = root / lay.folder
    folder.mkdir(exist_ok=True)
    for name, blob in files.items():
        _atomic_write(folder / name, blob)
    return folder

# ---------------------------------------------------------------------------------------------
# Synthetic data


def synthetic(n_train: int, n_test: int, num_classes: int = 10, seed: int = 0) -> CifarData:
    """Random but learnable images: each class has its own mean colour and stripe direction
    and frequency; each image adds a random stripe phase, brightness and pixel noise. A small
    CNN separates the classes within an epoch or two, which is what smoke tests and demos of
    the trainer need. `official=False`; `name` is "cifar10"/"cifar100" for 10/100 classes
    (the format it stands in for) and "synthetic" otherwise."""
    if num_classes < 1 or n_train < 0 or n_test < 0:
        raise ValueError("synthetic() needs num_classes >= 1 and non-negative sizes")
    rng = np.random.default_rng(seed)
    colour = rng.uniform(60, 195, size=(num_classes, 3)).astype(np.float32)
    angle = np.pi * np.arange(num_classes) / num_classes + rng.uniform(0, 0.2, num_classes)
    freq = rng.uniform(1.5, 4.0, num_classes)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 32.0

    def make(n: int) -> Split:
        labels = rng.integers(0, num_classes, size=n, dtype=np.int64)
        images = np.empty((n, *IMAGE_SHAPE), np.uint8)
        for s in range(0, n, 2048):   # bounded float32 working set
            y = labels[s:s + 2048]
            m = len(y)
            phase = rng.uniform(0, 2 * np.pi, size=(m, 1, 1)).astype(np.float32)
            ax = (np.cos(angle[y]) * freq[y] * 2 * np.pi).astype(np.float32)[:, None, None]
            ay = (np.sin(angle[y]) * freq[y] * 2 * np.pi).astype(np.float32)[:, None, None]
            stripes = np.sin(ax * xx + ay * yy + phase)[..., None] * 45.0           # m, 32, 32, 1
            bright = rng.normal(0, 12, size=(m, 1, 1, 1)).astype(np.float32)
            noise = rng.normal(0, 18, size=(m, 32, 32, 3)).astype(np.float32)
            x = colour[y][:, None, None, :] + stripes + bright + noise
            images[s:s + m] = np.clip(x, 0, 255).astype(np.uint8)
        return Split(images, labels)

    classes = (CIFAR10_CLASSES if num_classes == 10 else CIFAR100_CLASSES if num_classes == 100
               else [f"class_{k}" for k in range(num_classes)])
    name = {10: "cifar10", 100: "cifar100"}.get(num_classes, "synthetic")
    train, test = make(n_train), make(n_test)
    fp = hashlib.sha256(f"synthetic {n_train} {n_test} {num_classes} {seed}".encode()).hexdigest()[:16]
    return CifarData(name=name, train=train, test=test, classes=list(classes), official=False,
                     fingerprint=fp, source=f"synthetic(seed={seed})")


def synthetic_dir(root, n_train: int, n_test: int, *, seed: int = 0,
                  overwrite: bool = False) -> str:
    """`synthetic(n_train, n_test)` written as a CIFAR-10 folder under `root` (what a
    `--data-dir` takes); returns `root` as a string. The fixture most tool tests start from.
    Like `write_cifar`, it replaces data already there only with `overwrite=True`."""
    d = synthetic(n_train, n_test, seed=seed)
    write_cifar(root, train=(d.train.images, d.train.labels),
                test=(d.test.images, d.test.labels), overwrite=overwrite)
    return str(root)

