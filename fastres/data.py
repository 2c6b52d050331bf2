"""CIFAR-10 and CIFAR-100 in the official "python version" format.

`load_cifar(data_dir)` finds the data in `data_dir` (the extracted folder
`cifar-10-batches-py/` / `cifar-100-python/`, or the official `.tar.gz` read in place without
extracting), checks every file, and returns uint8 NHWC images and int64 labels. It records
whether each file's MD5 matches the official one: a copy that does not (such as the JPEG-75
copy in `shared/data/`) is accepted with one warning line and `official=False`, never
silently, so a run record always says which data it trained on.

On-disk format (Krizhevsky's "python version"): each batch is a protocol-2 pickle written by
Python 2 holding a dict with `data`, a [N, 3072] uint8 array whose rows are the R, G and B
planes (1024 bytes each, row-major 32x32) of one image, and `labels` (`fine_labels` and
`coarse_labels` for CIFAR-100). Keys are Python 2 strings, so they load as `'data'` with
`encoding='latin1'` and as `b'data'` with `encoding='bytes'`. This module only reads;
`fastres.testing.write_cifar` writes small data sets in that exact format for tests and
examples.

Speed: all of CIFAR-10 (180 MB in six pickles) loads in well under a second on two CPU cores:
files are read whole, MD5 and SHA-256 are computed on a background thread while the main
thread unpickles (hashlib releases the GIL on large buffers), and the planar rows are turned
into NHWC with three strided plane copies rather than one 4-D transpose (8x faster in numpy).
Hashing is therefore not cached: it costs ~0.3 s of CPU that overlaps parsing, and a cache
keyed on (path, size, mtime) could vouch for a file that was rewritten in place.

Security: the pickles are read with an unpickler that resolves only the numpy globals an
array needs, so a hostile file is reported as "not a CIFAR pickle" instead of running code.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from fastres.errors import DataError, unknown_choice
from fastres.errors import warn as warn_line

__all__ = [
    "Split", "CifarData", "load_cifar", "download_cifar", "channel_mean_std", "DATASETS", "CIFAR10_CLASSES", "CIFAR100_CLASSES",
    "CIFAR100_COARSE_CLASSES", "OFFICIAL_MD5", "ARCHIVE_MD5", "URLS",
]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]
# The names in the official `meta` file, in its (alphabetical) order. A real load reads them
# from `meta`; these are for data written or synthesised by fastres.testing, and for users.
CIFAR100_CLASSES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
CIFAR100_COARSE_CLASSES = """
aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices
household_furniture insects large_carnivores large_man-made_outdoor_things
large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals
non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2""".split()

URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
# MD5 of the official archives and of the files inside them (the same values torchvision
# checks in torchvision/datasets/cifar.py).
ARCHIVE_MD5 = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
}
OFFICIAL_MD5 = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
}

IMAGE_SHAPE = (32, 32, 3)  # H, W, C
_ROW = 32 * 32 * 3         # bytes per image row in a batch: R plane, G plane, B plane


@dataclass(frozen=True)
class _Layout:
    """Where a data set's files live and which keys they use."""

    name: str
    title: str
    folder: str              # the folder the archive extracts to
    archive: str             # the official archive's file name
    train_files: tuple
    test_files: tuple
    meta_file: str
    label_key: str           # labels in a batch
    class_key: str           # class names in the meta file
    num_classes: int         # how many the meta file names
    coarse_label_key: str | None = None
    coarse_class_key: str | None = None
    num_coarse_classes: int | None = None

    @property
    def files(self) -> tuple:
        return (self.meta_file, *self.train_files, *self.test_files)


LAYOUTS = {
    "cifar10": _Layout(
        "cifar10", "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        "labels", "label_names", 10),
    "cifar100": _Layout(
        "cifar100", "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
        ("train",), ("test",), "meta", "fine_labels", "fine_label_names", 100,
        "coarse_labels", "coarse_label_names", 20),
}
DATASETS = tuple(LAYOUTS)


@dataclass(frozen=True, eq=False)
class Split:
    """One split. eq=False: comparing arrays with `==` is ambiguous, so identity it is."""

    images: np.ndarray                        # (N, 32, 32, 3) uint8, NHWC, C-contiguous
    labels: np.ndarray                        # (N,) int64
    coarse_labels: np.ndarray | None = None   # (N,) int64, CIFAR-100 only

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True, eq=False)
class CifarData:
    name: str                # "cifar10" | "cifar100" (the format; see fastres.testing.synthetic)
    train: Split
    test: Split
    classes: list[str]
    official: bool           # every file's MD5 matches the official one
    fingerprint: str         # short sha256 over the contents read (same for folder and archive)
    source: str              # the folder or archive read
    coarse_classes: list[str] | None = None
    md5: dict[str, str] = field(default_factory=dict)   # file name -> MD5 of what was read

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def info(self) -> dict:
        """JSON-able summary for run records."""
        return {
            "name": self.name, "official": self.official, "fingerprint": self.fingerprint,
            "source": self.source, "num_classes": self.num_classes,
            "train_size": len(self.train), "test_size": len(self.test),
        }


def describe(info: dict, train_limit: int | None = None, test_limit: int | None = None) -> str:
    """One line naming the data a run reads: `info` is `CifarData.info()` (or a run
    record's copy); the limits are the config's `data.train_limit` / `data.test_limit`."""
    def limit(n: int | None, size) -> str:  # a limit above the data's size limits nothing
        return "all" if not n or (isinstance(size, int) and n > size) else str(n)

    return (f"data {info.get('name', '?')} "
            f"({'official' if info.get('official') else 'NOT official'}, fingerprint "
            f"{info.get('fingerprint')}), {info.get('train_size')} train / "
            f"{info.get('test_size')} test; limits train "
            f"{limit(train_limit, info.get('train_size'))}, test "
            f"{limit(test_limit, info.get('test_size'))}")


# ---------------------------------------------------------------------------------------------
# Finding the data


def _layout(dataset: str) -> _Layout:
    key = str(dataset).lower().replace("-", "").replace("_", "")
    if key not in LAYOUTS:
        raise unknown_choice("dataset", dataset, DATASETS)
    return LAYOUTS[key]


def _how_to_get(lay: _Layout, data_dir: Path) -> str:
    return (f"get it with `fastres data --data-dir {data_dir} --dataset {lay.name} --download` "
            f"(download=True in Python), or copy the official {lay.archive} into {data_dir} "
            f"(it is read without extracting)")


def _expected(lay: _Layout, data_dir: Path) -> str:
    return (f"{data_dir / lay.folder}/{{{','.join(lay.files)}}} "
            f"or {data_dir / lay.archive}")


def _other_hint(lay: _Layout, data_dir: Path) -> str:
    """' (found X: did you mean data.dataset=Y? ...)' when the other data set is there
    instead."""
    for other in LAYOUTS.values():
        if other is not lay and ((data_dir / other.folder).is_dir()
                                 or (data_dir / other.archive).is_file()):
            return (f" (found {other.title} there: did you mean data.dataset={other.name}? "
                    f"`--set data.dataset={other.name}`, or `--dataset {other.name}` for "
                    "`fastres data`)")
    return ""


def _locate(lay: _Layout, data_dir: Path) -> tuple[str, Path] | None:
    """('folder' | 'archive', path) for the data under data_dir, or None when absent.

    Accepts the parent folder (the usual `--data-dir`), the extracted folder itself, or the
    archive's own path. The extracted folder wins over an archive beside it."""
    if data_dir.is_file():
        if data_dir.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "archive", data_dir
        raise DataError(f"{data_dir} is a file, not a folder or a .tar.gz archive; "
                        f"pass the folder that holds {lay.folder}/ or {lay.archive}")
    if (data_dir / lay.folder).is_dir():
        return "folder", data_dir / lay.folder
    if data_dir.name == lay.folder or any((data_dir / f).is_file() for f in lay.files):
        return "folder", data_dir
    if (data_dir / lay.archive).is_file():
        return "archive", data_dir / lay.archive
    return None


# ---------------------------------------------------------------------------------------------
# Reading


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only what a pickled numpy array needs; anything else is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),   # how Python 3 writes bytes at protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR file never does")
        # numpy 2 moved numpy.core to numpy._core (the old path warns) and numpy 1 lacks the
        # new one; the functions are the same, so take whichever this numpy has.
        tries = [module]
        if module.startswith("numpy.core"):
            tries.insert(0, module.replace("numpy.core", "numpy._core", 1))
        elif module.startswith("numpy._core"):
            tries.append(module.replace("numpy._core", "numpy.core", 1))
        for m in tries[:-1]:
            try:
                return super().find_class(m, name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(tries[-1], name)


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # any parse failure is the file's fault, not ours
        if not blob:
            what = "is empty"
        elif blob[:1] != pickle.PROTO:
            what = "is not a pickle (does not start like one)"
        elif isinstance(e, EOFError) or "truncated" in str(e):
            what = "is truncated"
        else:
            what = "is corrupt or not a CIFAR pickle"
        raise DataError(f"{where} {what} ({type(e).__name__}: {e}); delete it and extract or "
                        f"download the data again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a {type(obj).__name__}, not the dict a CIFAR file holds; "
                        f"is this the right file?")
    # Python 2 pickles give bytes keys under encoding='bytes'; Python 3 ones give str.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _key(d: dict, key: str, where: str):
    if key not in d:
        raise DataError(f"{where} has no {key!r} entry (keys: {sorted(map(str, d))}); "
                        f"it is not a CIFAR file of this data set")
    return d[key]


def _names(d: dict, key: str, where: str, count: int, title: str) -> list[str]:
    names = _key(d, key, where)
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(f"{where}: {key!r} should be a non-empty list of class names")
    if len(names) != count:
        raise DataError(f"{where}: {key!r} names {len(names)} classes, where {title} has "
                        f"{count}; the file is not {title}'s")
    out = []
    for n in names:
        if isinstance(n, bytes):
            try:
                n = n.decode("utf-8")
            except UnicodeDecodeError:
                n = n.decode("latin1")
        out.append(str(n))
    twice = sorted({n for n in out if out.count(n) > 1})
    if twice:
        raise DataError(f"{where}: {key!r} names {', '.join(map(repr, twice))} more than once; "
                        "the file is corrupt")
    return out


def _labels(d: dict, key: str, n: int, where: str) -> np.ndarray:
    raw = _key(d, key, where)
    try:
        labels = np.asarray(raw)
    except Exception as e:
        raise DataError(f"{where}: {key!r} is not a list of integers ({e})") from None
    if labels.size == 0:  # [] reads as float64: an empty list of labels is still labels
        labels = labels.astype(np.int64)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{where}: {key!r} should be a list of integers, got shape "
                        f"{labels.shape} of {labels.dtype}; the file is not a CIFAR batch")
    if len(labels) != n:
        raise DataError(f"{where}: {len(labels)} {key!r} for {n} images; the file is corrupt")
    return labels.astype(np.int64, copy=False)


def _batch(d: dict, lay: _Layout, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rows = _key(d, "data", where)
    if not isinstance(rows, np.ndarray):
        raise DataError(f"{where}: 'data' is a {type(rows).__name__}, expected a numpy array")
    if rows.dtype != np.uint8:
        raise DataError(f"{where}: 'data' has dtype {rows.dtype}, expected uint8 (pixel values "
                        f"0-255); the file was not written in the CIFAR format")
    if rows.ndim != 2 or rows.shape[1] != _ROW:
        raise DataError(f"{where}: 'data' has shape {rows.shape}, expected [N, {_ROW}] (one row "
                        f"of R, G, B 32x32 planes per image); the file was not written in the "
                        f"CIFAR format")
    labels = _labels(d, lay.label_key, len(rows), where)
    coarse = _labels(d, lay.coarse_label_key, len(rows), where) if lay.coarse_label_key else None
    return rows, labels, coarse


def _check_range(labels: np.ndarray, k: int, what: str, where: str) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        bad = labels[(labels < 0) | (labels >= k)]
        raise DataError(f"{where}: {len(bad)} {what} outside 0..{k - 1} (e.g. {int(bad[0])}) "
                        f"for the {k} classes its meta file names; the files do not belong "
                        f"together or are corrupt")


def _to_nhwc(rows_list: Sequence[np.ndarray]) -> np.ndarray:
    """[N, 3072] planar rows -> (N, 32, 32, 3) uint8 NHWC, one strided copy per plane.

    Copying each 1024-byte plane into its channel is ~8x faster in numpy than materialising
    rows.reshape(N, 3, 32, 32).transpose(0, 2, 3, 1) (0.1 s vs 0.8 s for 50k images)."""
    n = sum(len(r) for r in rows_list)
    out = np.empty((n, *IMAGE_SHAPE), np.uint8)
    start = 0
    for rows in rows_list:
        end = start + len(rows)
        for c in range(3):
            np.copyto(out[start:end, :, :, c], rows[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32))
        start = end
    return out


def _read_folder(lay: _Layout, folder: Path) -> Iterator[tuple[str, bytes, str]]:
    for name in lay.files:
        if ((folder / name).exists() or (folder / name).is_symlink()) and \
                not (folder / name).is_file():
            raise DataError(f"{folder / name} is not a regular file (a folder, or a link to "
                            f"one); {folder} should hold the {lay.title} files themselves")
    missing = [name for name in lay.files if not (folder / name).is_file()]
    if missing:   # checked up front, before reading 150 MB of the files that are there
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise DataError(
            f"{folder / missing[0]} is missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
            f"{folder} holds {', '.join(present) or 'nothing'}, expected {', '.join(lay.files)}; "
            f"re-extract {lay.archive} there, or delete the folder and run "
            f"`fastres data --data-dir {folder.parent} --dataset {lay.name} --download`")
    for name in lay.files:
        path = folder / name
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        yield name, blob, str(path)


def _read_archive(lay: _Layout, archive: Path) -> Iterator[tuple[str, bytes, str]]:
    """Members of the archive, in archive order, decompressed in one streaming pass.

    Stream mode ('r|*') reads the gzip once front to back; random access into a .tar.gz
    would re-decompress from the start for each member."""
    wanted = {f"{lay.folder}/{name}": name for name in lay.files}
    found = set()
    fix = (f"delete it and download it again (`fastres data --data-dir {archive.parent} "
           f"--dataset {lay.name} --download`) or copy a good copy of {lay.archive} there")
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                name = wanted.get(member.name.removeprefix("./"))
                if name is None or not member.isfile() or name in found:
                    continue
                found.add(name)
                yield name, tar.extractfile(member).read(), f"{archive}:{member.name}"
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"archive {archive} is corrupt or truncated ({type(e).__name__}: {e}); "
                        f"{fix}") from None
    missing = [n for n in lay.files if n not in found]
    if missing:
        raise DataError(f"archive {archive} lacks {', '.join(f'{lay.folder}/{m}' for m in missing)}; "
                        f"it is not the official {lay.archive}: {fix}")


def _hashes(blob: bytes) -> tuple[str, str]:
    return hashlib.md5(blob).hexdigest(), hashlib.sha256(blob).hexdigest()


def load_cifar(data_dir, dataset: str = "cifar10", download: bool = False, *,
               warn: Callable[[str], None] = warn_line) -> CifarData:
    """Load CIFAR-10 or CIFAR-100 from `data_dir`, downloading the official archive first when
    it is absent and `download` is true.

    `data_dir` may hold the extracted folder (`cifar-10-batches-py/`, `cifar-100-python/`) or
    the official `.tar.gz`, or be either of those itself. Data whose MD5s differ from the
    official files is loaded, `warn` is called once with one line saying so, and the result
    carries `official=False`. Any problem with the files raises `DataError` naming the path
    and the fix.
    """
    lay = _layout(dataset)
    data_dir = Path(data_dir).expanduser()
    found = _locate(lay, data_dir) if data_dir.exists() else None
    if found is None:
        if download:
            found = "archive", download_cifar(data_dir, lay.name)
        elif not data_dir.exists():
            raise DataError(f"data directory {data_dir} does not exist; expected "
                            f"{_expected(lay, data_dir)}: {_how_to_get(lay, data_dir)}")
        else:
            contents = sorted(p.name for p in data_dir.iterdir())
            held = (f"holds only {', '.join(contents[:5])}{', ...' if len(contents) > 5 else ''}"
                    if contents else "is empty")
            raise DataError(f"no {lay.title} data in {data_dir} (it {held}){_other_hint(lay, data_dir)}; "
                            f"expected {_expected(lay, data_dir)}: {_how_to_get(lay, data_dir)}")
    kind, path = found
    files = _read_archive(lay, path) if kind == "archive" else _read_folder(lay, path)

    parsed: dict[str, tuple] = {}
    hashes: dict[str, Future] = {}
    # Hash on a second thread while this one unpickles; the two overlap because hashlib
    # drops the GIL for large buffers.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastres-hash") as pool:
        for name, blob, where in files:
            hashes[name] = pool.submit(_hashes, blob)
            d = _unpickle(blob, where)
            del blob
            if name == lay.meta_file:
                classes = _names(d, lay.class_key, where, lay.num_classes, lay.title)
                coarse_classes = _names(d, lay.coarse_class_key, where, lay.num_coarse_classes,
                                        lay.title) if lay.coarse_class_key else None
            else:
                parsed[name] = (_batch(d, lay, where), where)
        digests = {name: f.result() for name, f in hashes.items()}

    def split(names):
        batches = [parsed[n][0] for n in names]
        if not sum(len(b[1]) for b in batches):
            raise DataError(f"{' and '.join(parsed[n][1] for n in names)} "
                            f"{'holds' if len(names) == 1 else 'hold'} no images; the data "
                            "set is incomplete or was written empty")
        for n in names:
            (_, labels, coarse), where = parsed[n]
            _check_range(labels, len(classes), "labels", where)
            if coarse is not None:
                _check_range(coarse, len(coarse_classes), "coarse labels", where)
        return Split(
            images=_to_nhwc([b[0] for b in batches]),
            labels=np.concatenate([b[1] for b in batches]),
            coarse_labels=np.concatenate([b[2] for b in batches]) if lay.coarse_label_key else None)

    train, test = split(lay.train_files), split(lay.test_files)
    md5 = {name: digests[name][0] for name in lay.files}
    official_md5 = OFFICIAL_MD5[lay.name]
    differ = [n for n in lay.files if md5[n] != official_md5.get(n)]
    if differ:
        warn(f"{path} is not the official {lay.title} data: the MD5 of {len(differ)} of "
             f"{len(lay.files)} files ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}) "
             f"differs; using it anyway and recording official=False")
    # One fingerprint for the contents, whether they came from the folder or the archive.
    fingerprint = hashlib.sha256(
        "".join(f"{n} {digests[n][1]}\n" for n in sorted(lay.files)).encode()).hexdigest()[:16]
    return CifarData(name=lay.name, train=train, test=test, classes=classes,
                     official=not differ, fingerprint=fingerprint, source=str(path),
                     coarse_classes=coarse_classes, md5=md5)


# ---------------------------------------------------------------------------------------------
# Downloading


def _md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_cifar(data_dir, dataset: str = "cifar10", *, url: str | None = None,
                   timeout: float = 60.0, log: Callable[[str], None] | None = None,
                   overwrite: bool = False) -> Path:
    """Download the official archive into `data_dir` and verify its MD5; return its path.

    The archive is used as it is (`load_cifar` reads it without extracting). It is written to
    a temporary file in `data_dir` and renamed into place only after the MD5 matches, so an
    interrupted or corrupt download never leaves a file that looks complete. An archive
    already there with the right MD5 is kept; a file of that name with another MD5 (a
    re-encoded copy, a partial download made by hand) is the user's and is refused with a
    `DataError`, unless `overwrite=True` lets the verified download replace it. `url`
    overrides the official address (a mirror); the MD5 checked is the official one either way.
    """
    lay = _layout(dataset)
    data_dir = Path(data_dir).expanduser()
    url = url or URLS[lay.name]
    log = log or (lambda m: print(f"fastres: {m}", file=sys.stderr))
    dest = data_dir / lay.archive
    want = ARCHIVE_MD5[lay.name]
    if dest.is_file():
        if _md5_file(dest) == want:
            return dest
        if not overwrite:
            raise DataError(f"{dest} exists and is not the official {lay.archive} (its MD5 "
                            f"differs); move it away, or pass overwrite=True to replace it with "
                            f"the download")
        log(f"{dest} exists but its MD5 is not the official one; replacing it (overwrite=True) "
            f"once the download is verified")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create data directory {data_dir}: {e.strerror or e}") from None
    offline = (f"this machine may have no network: download {url} elsewhere and copy "
               f"{lay.archive} into {data_dir} (it is read without extracting)")
    log(f"downloading {url} -> {dest}")
    t0 = time.perf_counter()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{lay.archive}.", suffix=".part", dir=data_dir)
        h, size = hashlib.md5(), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            expected_size = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                size += len(chunk)
        if expected_size is not None and size != int(expected_size):
            raise DataError(f"download of {url} stopped after {size} of {expected_size} bytes; "
                            f"run it again, or {offline}")
        got = h.hexdigest()
        if got != want:
            raise DataError(f"download of {url} is corrupt: MD5 {got}, expected {want}; run it "
                            f"again, or {offline}")
        os.replace(tmp, dest)
        tmp = None
    except urllib.error.HTTPError as e:
        raise DataError(f"cannot download {url}: the server answered HTTP {e.code} {e.reason}; "
                        f"{offline}") from None
    except urllib.error.URLError as e:
        raise DataError(f"cannot download {url}: {e.reason}; {offline}") from None
    except (TimeoutError, ConnectionError) as e:
        raise DataError(f"cannot download {url}: {type(e).__name__}: {e}; {offline}") from None
    except OSError as e:  # socket errors, http.client.IncompleteRead's kin, a full disk
        raise DataError(f"cannot download {url} to {data_dir}: {type(e).__name__}: {e}; "
                        f"{offline}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    log(f"downloaded {dest} ({size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s, MD5 ok)")
    return dest


# ---------------------------------------------------------------------------------------------
# Statistics


def channel_mean_std(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 NHWC images, in [0, 1] units.

    Exact: accumulates a 256-bin histogram per channel in chunks, so the working set stays
    small (np.bincount widens its input to int64) and no float copy of the data is made."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 NHWC images, got {images.shape} {images.dtype}")
    c = images.shape[-1]
    hist = np.zeros((c, 256), np.int64)
    for s in range(0, len(images), chunk):
        px = images[s:s + chunk].reshape(-1, c)
        for k in range(c):
            hist[k] += np.bincount(px[:, k], minlength=256)
    n = hist.sum(1).astype(np.float64)
    if not n.all():
        raise ValueError("no images")
    v = np.arange(256, dtype=np.float64) / 255.0
    mean = hist @ v / n
    var = hist @ (v * v) / n - mean * mean
    return tuple(mean.tolist()), tuple(np.sqrt(np.maximum(var, 0.0)).tolist())
