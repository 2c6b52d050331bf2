"""The CIFAR data layer against small files written in the real on-disk formats.

Never touches the network: downloads go through a monkeypatched urlopen."""
import hashlib
import io
import json
import os
import pickle
import re
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fastres.tools import cli
from fastres import data as D
from fastres import testing as T
from fastres.errors import ConfigError, DataError
from fastres.tools import data as tool


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def c10():
    rng = np.random.default_rng(0)
    return ((_images(rng, 23), rng.integers(0, 10, 23)), (_images(rng, 7), rng.integers(0, 10, 7)))


@pytest.fixture
def c100():
    rng = np.random.default_rng(1)
    tr_fine, te_fine = rng.integers(0, 100, 12), rng.integers(0, 100, 5)
    return ((_images(rng, 12), tr_fine, rng.integers(0, 20, 12)),
            (_images(rng, 5), te_fine, rng.integers(0, 20, 5)))


class Warnings(list):
    def __call__(self, message):
        self.append(message)


def _load(path, dataset="cifar10", **kw):
    w = Warnings()
    return D.load_cifar(path, dataset, warn=w, **kw), w


def _assert_split(split, images, labels):
    assert split.images.shape == images.shape and split.images.dtype == np.uint8
    assert split.images.flags.c_contiguous
    np.testing.assert_array_equal(split.images, images)
    assert split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.labels, labels)


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
def test_cifar10_round_trip(tmp_path, c10, archive):
    (trx, try_), (tex, tey) = c10
    written = T.write_cifar(tmp_path, "cifar10", train=(trx, try_), test=(tex, tey), archive=archive)
    assert written == tmp_path / ("cifar-10-python.tar.gz" if archive else "cifar-10-batches-py")
    d, warned = _load(tmp_path)
    _assert_split(d.train, trx, try_)
    _assert_split(d.test, tex, tey)
    assert d.name == "cifar10" and d.classes == D.CIFAR10_CLASSES
    assert d.source == str(written)
    assert d.official is False and len(warned) == 1 and "not the official" in warned[0]
    info = d.info()
    assert json.loads(json.dumps(info)) == info
    assert info["train_size"] == 23 and info["test_size"] == 7 and info["official"] is False


def test_cifar10_files_match_the_official_layout(tmp_path, c10):
    (trx, try_), test = c10
    folder = T.write_cifar(tmp_path, "cifar10", train=(trx, try_), test=test)
    assert sorted(p.name for p in folder.iterdir()) == sorted(D.OFFICIAL_MD5["cifar10"])
    raw = (folder / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02"                             # protocol 2
    latin1 = pickle.loads(raw, encoding="latin1")             # how torchvision reads them
    as_bytes = pickle.loads(raw, encoding="bytes")            # how the CIFAR web page reads them
    assert b"data" in as_bytes and b"labels" in as_bytes and "data" in latin1
    rows = latin1["data"]
    assert rows.dtype == np.uint8 and rows.shape == (5, 3072)  # 23 images over 5 batches: 5,5,5,4,4
    # each row: the R plane, then G, then B, each a row-major 32x32 image
    img = trx[0]
    np.testing.assert_array_equal(rows[0, :1024], img[:, :, 0].ravel())
    np.testing.assert_array_equal(rows[0, 1024:2048], img[:, :, 1].ravel())
    np.testing.assert_array_equal(rows[0, 2048:], img[:, :, 2].ravel())
    assert rows[0, 1] == img[0, 1, 0] and rows[0, 32] == img[1, 0, 0]
    assert latin1["labels"] == [int(v) for v in try_[:5]]
    meta = pickle.loads((folder / "batches.meta").read_bytes(), encoding="latin1")
    assert meta["label_names"] == D.CIFAR10_CLASSES
    sizes = [len(pickle.loads((folder / f"data_batch_{i}").read_bytes(), encoding="latin1")["labels"])
             for i in range(1, 6)]
    assert sizes == [5, 5, 5, 4, 4]


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "archive"])
def test_cifar100_round_trip(tmp_path, c100, archive):
    train, test = c100
    T.write_cifar(tmp_path, "cifar100", train=train, test=test, archive=archive)
    d, warned = _load(tmp_path, "cifar100")
    _assert_split(d.train, *train[:2])
    _assert_split(d.test, *test[:2])
    np.testing.assert_array_equal(d.train.coarse_labels, train[2])
    np.testing.assert_array_equal(d.test.coarse_labels, test[2])
    assert d.classes == D.CIFAR100_CLASSES and len(d.classes) == 100
    assert d.coarse_classes == D.CIFAR100_COARSE_CLASSES and len(d.coarse_classes) == 20
    assert d.name == "cifar100" and not d.official and len(warned) == 1


def test_cifar100_pickle_keys(tmp_path, c100):
    folder = T.write_cifar(tmp_path, "cifar100", train=c100[0], test=c100[1])
    train = pickle.loads((folder / "train").read_bytes(), encoding="latin1")
    assert {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"} <= set(train)
    meta = pickle.loads((folder / "meta").read_bytes(), encoding="bytes")
    assert meta[b"coarse_label_names"][0] == b"aquatic_mammals"


def test_custom_classes_and_path_forms(tmp_path, c10):
    names = [f"k{i}" for i in range(10)]
    folder = T.write_cifar(tmp_path / "a", "cifar10", train=c10[0], test=c10[1], classes=names)
    arch = T.write_cifar(tmp_path / "b", "cifar10", train=c10[0], test=c10[1], archive=True)
    by_parent, _ = _load(tmp_path / "a")
    by_folder, _ = _load(folder)           # the extracted folder itself
    by_archive, _ = _load(arch)            # the archive's own path
    assert by_parent.classes == by_folder.classes == names
    assert by_parent.source == by_folder.source == str(folder)
    assert by_archive.source == str(arch)
    # the fingerprint is over the contents, so the folder and the archive of the same files
    # agree; different data gives a different one
    assert by_archive.fingerprint != by_parent.fingerprint  # class names differ
    T.write_cifar(tmp_path / "c", "cifar10", train=c10[0], test=c10[1], archive=True, classes=names)
    assert _load(tmp_path / "c")[0].fingerprint == by_parent.fingerprint


def test_folder_preferred_over_archive(tmp_path, c10):
    T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1], archive=True)
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    assert _load(tmp_path)[0].source == str(folder)


# -- official or not ----------------------------------------------------------------------


def _md5s(folder):
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_official_detection(tmp_path, c10, monkeypatch):
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    monkeypatch.setitem(D.OFFICIAL_MD5, "cifar10", _md5s(folder))
    d, warned = _load(tmp_path)
    assert d.official is True and warned == [] and d.info()["official"] is True
    assert d.md5 == _md5s(folder)
    # one file off is enough to lose the label
    table = dict(_md5s(folder), test_batch="0" * 32)
    monkeypatch.setitem(D.OFFICIAL_MD5, "cifar10", table)
    d, warned = _load(tmp_path)
    assert d.official is False and len(warned) == 1 and "1 of 7 files (test_batch)" in warned[0]


def test_official_detection_in_archive(tmp_path, c100, monkeypatch):
    folder = T.write_cifar(tmp_path / "f", "cifar100", train=c100[0], test=c100[1])
    T.write_cifar(tmp_path / "a", "cifar100", train=c100[0], test=c100[1], archive=True)
    monkeypatch.setitem(D.OFFICIAL_MD5, "cifar100", _md5s(folder))
    d, warned = _load(tmp_path / "a", "cifar100")
    assert d.official and not warned


def test_default_warning_is_one_stderr_line(tmp_path, c10, capsys):
    T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    D.load_cifar(tmp_path)
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "not the official CIFAR-10 data" in err and "official=False" in err


# -- errors -------------------------------------------------------------------------------


def _error(path, dataset="cifar10", **kw) -> str:
    with pytest.raises(DataError) as e:
        D.load_cifar(path, dataset, warn=lambda m: None, **kw)
    return str(e.value)


def test_missing_directory(tmp_path):
    msg = _error(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg and "does not exist" in msg
    assert "--download" in msg and "cifar-10-python.tar.gz" in msg and "data_batch_1" in msg


def test_empty_directory(tmp_path):
    msg = _error(tmp_path)
    assert "is empty" in msg and str(tmp_path) in msg
    assert "fastres data --data-dir" in msg and "--download" in msg and "test_batch" in msg


def test_wrong_dataset_hint(tmp_path, c10):
    T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    msg = _error(tmp_path, "cifar100")
    assert "did you mean data.dataset=cifar10?" in msg and "--set data.dataset=cifar10" in msg


@pytest.mark.parametrize("change, words", [
    (lambda f: f.__setitem__("batches.meta", {"label_names": [f"c{i}" for i in range(11)]}),
     "'label_names' names 11 classes, where CIFAR-10 has 10"),
    (lambda f: f.__setitem__("batches.meta", {"label_names": ["cat"] * 2 + list("abcdefgh")}),
     "names 'cat' more than once"),
    (lambda f: f.__setitem__("test_batch", {"data": np.zeros((0, 3072), np.uint8),
                                            "labels": []}), "holds no images"),
    (lambda f: f.__setitem__("data_batch_2", {"data": np.zeros((0, 3072), np.uint8),
                                              "labels": [1]}), "1 'labels' for 0 images"),
])
def test_files_that_do_not_make_cifar10(tmp_path, c10, change, words):
    """A meta file with another class count, an empty test set, labels without images:
    one line naming the file, not a run on a wrong head or a top-1 of 0 on no images."""
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    files = {}
    change(files)
    for name, d in files.items():
        (folder / name).write_bytes(pickle.dumps(d))
    assert words in _error(tmp_path)


def test_a_batch_that_is_a_folder_is_named_so(tmp_path, c10):
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    (folder / "data_batch_2").unlink()
    (folder / "data_batch_2").mkdir()
    assert "data_batch_2 is not a regular file" in _error(tmp_path)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ConfigError, match="cifar100"):
        D.load_cifar(tmp_path, "cifar1000")


def test_missing_batch(tmp_path, c10):
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    (folder / "data_batch_3").unlink()
    msg = _error(tmp_path)
    assert str(folder / "data_batch_3") in msg and "missing" in msg and "re-extract" in msg


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b"\x89PNG\r\n\x1a\n" + b[8:], "not a pickle"),
    (lambda b: b"", "empty"),
])
def test_truncated_or_not_pickle(tmp_path, c10, damage, words):
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    path = folder / "data_batch_2"
    path.write_bytes(damage(path.read_bytes()))
    msg = _error(tmp_path)
    assert str(path) in msg and words in msg and "again" in msg


def test_hostile_pickle_is_refused_not_run(tmp_path, c10):
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil()}, protocol=2))
    msg = _error(tmp_path)
    assert "not a CIFAR pickle" in msg and "posix.mkdir" in msg
    assert not marker.exists()


def _rewrite(path, **changes):
    """Rewrite one batch with some entries changed, in the official (Python 2) pickle style."""
    d = pickle.loads(path.read_bytes(), encoding="latin1")
    d.update(changes)
    path.write_bytes(T._dump_py2(d))


def test_wrong_shape(tmp_path, c10):
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    _rewrite(folder / "data_batch_1", data=np.zeros((5, 32, 32, 3), np.uint8))
    msg = _error(tmp_path)
    assert "data_batch_1" in msg and "(5, 32, 32, 3)" in msg and "[N, 3072]" in msg
    _rewrite(folder / "data_batch_1", data=np.zeros((5, 3071), np.uint8))
    assert "(5, 3071)" in _error(tmp_path)


def test_wrong_dtype(tmp_path, c10):
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    _rewrite(folder / "data_batch_4", data=np.zeros((4, 3072), np.float32))
    msg = _error(tmp_path)
    assert "data_batch_4" in msg and "float32" in msg and "uint8" in msg
    # a file pickled by Python 3 (unicode keys, numpy 2 globals) is read just the same
    d = pickle.loads((folder / "data_batch_4").read_bytes(), encoding="latin1")
    d["data"] = np.zeros((4, 3072), np.int64)
    (folder / "data_batch_4").write_bytes(pickle.dumps(d, protocol=2))
    assert "int64" in _error(tmp_path)


def test_labels_wrong_count_or_type(tmp_path, c10):
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    _rewrite(folder / "test_batch", labels=[1, 2])
    assert "2 'labels' for 7 images" in _error(tmp_path)
    _rewrite(folder / "test_batch", labels=["a"] * 7)
    assert "list of integers" in _error(tmp_path)


@pytest.mark.parametrize("bad", [10, -1])
def test_labels_out_of_range(tmp_path, c10, bad):
    folder = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    labels = [0] * 7
    labels[3] = bad
    _rewrite(folder / "test_batch", labels=labels)
    msg = _error(tmp_path)
    assert str(folder / "test_batch") in msg and "outside 0..9" in msg and f"e.g. {bad}" in msg


def test_coarse_labels_out_of_range(tmp_path, c100):
    folder = T.write_cifar(tmp_path, "cifar100", train=c100[0], test=c100[1])
    _rewrite(folder / "test", coarse_labels=[20] * 5)
    assert "coarse labels outside 0..19" in _error(tmp_path, "cifar100")


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],            # truncated download
    lambda b: b[:100] + b"\0" * 64 + b[164:],   # flipped bytes in the deflate stream
    lambda b: b"not a gzip file at all",
], ids=["truncated", "garbled", "garbage"])
def test_corrupt_archive(tmp_path, c10, damage):
    arch = T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1], archive=True)
    arch.write_bytes(damage(arch.read_bytes()))
    msg = _error(tmp_path)
    assert str(arch) in msg and ("corrupt" in msg or "lacks" in msg) and "--download" in msg


def test_archive_missing_member(tmp_path, c10):
    arch = T.write_cifar(tmp_path / "src", "cifar10", train=c10[0], test=c10[1], archive=True)
    out = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(arch) as src, tarfile.open(out, "w:gz") as dst:
        for m in src.getmembers():
            if not m.name.endswith("data_batch_5"):
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    msg = _error(out)
    assert "lacks cifar-10-batches-py/data_batch_5" in msg


# -- download -----------------------------------------------------------------------------


class FakeResponse(io.BytesIO):
    def __init__(self, payload, length=None):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload) if length is None else length)}


def _no_leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if p.name.endswith(".part")] == []


@pytest.mark.parametrize("error", [
    urllib.error.URLError(OSError(-3, "Temporary failure in name resolution")),
    TimeoutError("timed out"),
    ConnectionResetError(104, "Connection reset by peer"),
], ids=["dns", "timeout", "reset"])
def test_download_without_network(tmp_path, monkeypatch, error):
    def urlopen(*a, **k):
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    msg = _error(tmp_path / "new", download=True)
    assert "cannot download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert "no network" in msg and "copy cifar-10-python.tar.gz into" in msg
    assert _no_leftovers(tmp_path / "new")


def test_download_http_error(tmp_path, monkeypatch):
    def urlopen(url, **k):
        raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(DataError, match="HTTP 404"):
        D.download_cifar(tmp_path, "cifar100", log=lambda m: None)


def test_download_verifies_md5_and_renames_atomically(tmp_path, c10, monkeypatch):
    payload = T.write_cifar(tmp_path / "server", "cifar10", train=c10[0], test=c10[1],
                            archive=True).read_bytes()
    calls = []

    def urlopen(url, timeout=None):
        calls.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    dest = tmp_path / "data"
    # the official MD5 does not match our little archive: refused, nothing left behind
    with pytest.raises(DataError, match="corrupt: MD5"):
        D.download_cifar(dest, log=lambda m: None)
    assert not (dest / "cifar-10-python.tar.gz").exists() and _no_leftovers(dest)

    monkeypatch.setitem(D.ARCHIVE_MD5, "cifar10", hashlib.md5(payload).hexdigest())
    logged = []
    path = D.download_cifar(dest, log=logged.append)
    assert path == dest / "cifar-10-python.tar.gz" and path.read_bytes() == payload
    assert calls == [D.URLS["cifar10"]] * 2 and len(logged) == 2 and _no_leftovers(dest)
    # already there with the right MD5: no second download
    assert D.download_cifar(dest, log=logged.append) == path and len(calls) == 2
    d, _ = _load(dest, download=True)
    assert len(calls) == 2 and d.source == str(path)
    _assert_split(d.train, *c10[0])


def test_download_never_replaces_a_file_it_did_not_make(tmp_path, monkeypatch):
    payload = b"the official archive"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(payload))
    monkeypatch.setitem(D.ARCHIVE_MD5, "cifar10", hashlib.md5(payload).hexdigest())
    mine = tmp_path / "cifar-10-python.tar.gz"
    mine.write_bytes(b"a copy of my own")
    with pytest.raises(DataError, match="exists and is not the official .*overwrite=True"):
        D.download_cifar(tmp_path, log=lambda m: None)
    assert mine.read_bytes() == b"a copy of my own" and _no_leftovers(tmp_path)
    assert D.download_cifar(tmp_path, log=lambda m: None, overwrite=True) == mine
    assert mine.read_bytes() == payload and _no_leftovers(tmp_path)


def test_load_with_download(tmp_path, c100, monkeypatch, capsys):
    payload = T.write_cifar(tmp_path / "server", "cifar100", train=c100[0], test=c100[1],
                            archive=True).read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(payload))
    monkeypatch.setitem(D.ARCHIVE_MD5, "cifar100", hashlib.md5(payload).hexdigest())
    d, _ = _load(tmp_path / "fresh", "cifar100", download=True)
    assert d.source == str(tmp_path / "fresh" / "cifar-100-python.tar.gz")
    _assert_split(d.test, *c100[1][:2])


def test_download_truncated(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: FakeResponse(b"x" * 10, length=1000))
    with pytest.raises(DataError, match="stopped after 10 of 1000 bytes"):
        D.download_cifar(tmp_path, log=lambda m: None)
    assert _no_leftovers(tmp_path)


# -- write_cifar, synthetic, statistics ---------------------------------------------------


def test_write_cifar_rejects_bad_input(tmp_path, c10):
    with pytest.raises(ValueError, match="uint8"):
        T.write_cifar(tmp_path, "cifar10", train=(c10[0][0].astype(np.float32), c10[0][1]), test=c10[1])
    with pytest.raises(ValueError, match="labels"):
        T.write_cifar(tmp_path, "cifar10", train=(c10[0][0], c10[0][1][:3]), test=c10[1])
    with pytest.raises(ValueError, match="0..9"):
        T.write_cifar(tmp_path, "cifar10", train=(c10[0][0], c10[0][1] + 10), test=c10[1])


def test_synthetic_is_deterministic_and_learnable():
    a, b = T.synthetic(600, 200, seed=3), T.synthetic(600, 200, seed=3)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    np.testing.assert_array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, T.synthetic(600, 200, seed=4).train.images)
    assert a.train.images.shape == (600, 32, 32, 3) and a.train.images.dtype == np.uint8
    assert a.train.labels.dtype == np.int64 and a.official is False and a.name == "cifar10"
    assert a.classes == D.CIFAR10_CLASSES and a.info()["official"] is False
    # learnable: nearest class-mean colour already beats chance by far
    feats = lambda s: s.images.reshape(len(s), -1, 3).mean(1)
    centroids = np.stack([feats(a.train)[a.train.labels == k].mean(0) for k in range(10)])
    pred = np.linalg.norm(feats(a.test)[:, None] - centroids[None], axis=2).argmin(1)
    assert (pred == a.test.labels).mean() > 0.6
    assert T.synthetic(10, 5, num_classes=100).name == "cifar100"
    assert T.synthetic(10, 5, num_classes=7).classes[-1] == "class_6"


def test_synthetic_round_trips_through_the_format(tmp_path):
    s = T.synthetic(40, 10, seed=1)
    T.write_cifar(tmp_path, "cifar10", train=(s.train.images, s.train.labels),
                  test=(s.test.images, s.test.labels), archive=True)
    d, _ = _load(tmp_path)
    _assert_split(d.train, s.train.images, s.train.labels)


def test_channel_mean_std():
    x = np.random.default_rng(0).integers(0, 256, size=(37, 32, 32, 3), dtype=np.uint8)
    mean, std = D.channel_mean_std(x, chunk=5)
    f = x.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, f.std(0), rtol=1e-10)


# -- the `fastres data` command -------------------------------------------------------------


def test_cli_text(tmp_path, c10, capsys):
    T.write_cifar(tmp_path, "cifar10", train=c10[0], test=c10[1])
    assert tool.main(["--data-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "not the official CIFAR-10 data" in err
    assert "official:    NO" in out and "train 23, test 7, 10 classes" in out
    train_n, test_n = np.bincount(c10[0][1], minlength=10), np.bincount(c10[1][1], minlength=10)
    for k, name in enumerate(D.CIFAR10_CLASSES):
        assert re.search(rf"^ +{name} +{train_n[k]} +{test_n[k]}$", out, re.M), name
    mean, std = D.channel_mean_std(c10[0][0])
    assert f"train std  (R, G, B): {std[0]:.4f}" in out
    assert "fingerprint:" in out


def test_cli_json(tmp_path, c100, capsys):
    T.write_cifar(tmp_path, "cifar100", train=c100[0], test=c100[1], archive=True)
    assert tool.main(["--data-dir", str(tmp_path), "--dataset", "cifar100", "--json"]) == 0
    out, err = capsys.readouterr()
    s = json.loads(out)
    assert s["name"] == "cifar100" and s["official"] is False and "not the official" in s["warning"]
    assert s["train_size"] == 12 and s["test_size"] == 5 and len(s["classes"]) == 100
    assert sum(s["train_per_class"].values()) == 12
    assert s["train_per_class"]["apple"] == int((c100[0][1] == 0).sum())
    np.testing.assert_allclose(s["train_std"], D.channel_mean_std(c100[0][0])[1], atol=1e-6)
    assert s["source"].endswith("cifar-100-python.tar.gz") and len(s["fingerprint"]) == 16


def test_cli_error_exit_code(tmp_path, capsys):
    assert cli.main(["data", "--data-dir", str(tmp_path / "missing")]) == 2
    out, err = capsys.readouterr()
    assert "fastres data: error:" in err and "does not exist" in err and "--download" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_download_no_network(tmp_path, monkeypatch, capsys):
    def urlopen(*a, **k):
        raise urllib.error.URLError("Network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert cli.main(["data", "--data-dir", str(tmp_path), "--download"]) == 2
    err = capsys.readouterr().err
    assert "Network is unreachable" in err and "copy cifar-10-python.tar.gz" in err
