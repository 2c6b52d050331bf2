"""`fastres pack-dali`: an offline install kit for NVIDIA DALI, in parts small enough to
carry one at a time to a machine with no network and a cap on each transfer.

    fastres pack-dali --python 3.12 --out KIT         # pack the DALI installed here
    fastres pack-dali --verify KIT                    # check every part against the manifest
    fastres pack-dali --install KIT --target T        # check, reassemble, unpack into T
    fastres pack-dali --install A B C --target T      # the same, parts spread over folders
    PYTHONPATH=T python3 -c "import nvidia.dali"      # use it (the target's own Python)

Moving a kit: copy MANIFEST.json and the parts with any tool, in any number of transfers,
into one folder or several; --verify and --install take every folder that holds some of
them, find each part, and stop with one line on a part that is missing, in two folders,
truncated or corrupt, a stray part of another kit, or two different manifests.

What goes in (from this environment's site-packages), for one target Python:
  * nvidia/dali without C++ headers (include/), bytecode, or the backend_impl and
    python_function_plugin modules of other Pythons (8 of each ship, ~6 MB a Python);
    its bundled libraries (.libs/: ffmpeg, sndfile, cv-cuda, cloud storage clients) stay,
    because libdali.so links them at load time;
  * nvidia/__init__.py (the pkgutil namespace hook, so `nvidia.*` packages of the target
    stay importable beside the kit) and DALI's METADATA;
  * the Python packages DALI imports at `import nvidia.dali` that a PyTorch image lacks:
    astunparse, gast (pure Python) and optree (compiled: for another Python it comes from
    a wheel, from --wheels or fetched once with pip download);
  * the CUDA libraries DALI loads lazily for its image decoders and `inflate`
    (nvimgcodec and its extensions, nvjpeg, nvjpeg2k, nvtiff, nvcomp), placed where
    DALI's and nvimgcodec's RUNPATHs ($ORIGIN/../...) look. The fastres DALI loader
    (external source, crop_mirror_normalize, erase) needs none of them: --no-codecs
    leaves them out (416 instead of 488 MiB unpacked; 126 instead of 158 MiB packed, the
    same three 60 MiB parts for Python 3.12).
CUDA itself is not packed: DALI links its CUDA runtime statically and loads libcuda and
NVML from the driver.

Format: one xz-compressed tar (LZMA2 preset 9e, Python's lzma: the stdlib of every target
Python reads it; zstd would need a module the target lacks), cut into parts of at most
--part-mib MiB, and MANIFEST.json with the SHA-256 and size of every part and of the whole.
`--install` checks every part before writing anything, unpacks with tarfile's "data"
filter (no absolute paths, links or devices), and into a staging folder first.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import importlib.util
import io
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fastres.errors import FastresError

KIT_FORMAT = 1
MANIFEST = "MANIFEST.json"
MARKER = ".fastres-dali-kit.json"      # written into an install target
INSTALLING = ".fastres-dali-installing"  # present while an install replaces the kit
PART_MIB = 60
# DALI's runtime imports that a PyTorch image (numpy, six, packaging, typing_extensions)
# lacks. DALI also lists nvtx, makefun and libcst: only its experimental dynamic mode
# imports them.
PY_DEPS = ("astunparse", "gast", "optree")
# --codecs: folders under site-packages/nvidia (DALI's RUNPATH has $ORIGIN/../nvimgcodec,
# ../libnvcomp/lib64, ../cu13/lib; nvimgcodec's extensions look in ../nvjpeg2k/lib etc.)
CODEC_DIRS = ("nvimgcodec", "libnvcomp", "nvjpeg2k", "nvtiff")
NVJPEG = "libnvjpeg.so"
PLATFORM_TAG = "x86_64-linux-gnu"
# A compiled module for one Python: name.cpython-312-x86_64-linux-gnu.so (also 314t).
_EXT_RE = re.compile(r"\.cpython-(\d+t?)-[A-Za-z0-9_]+-linux-gnu\.so$")
_CHUNK = 1 << 20


class KitError(FastresError):
    """A kit folder that is missing, incomplete, corrupt, or for another Python."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres pack-dali",
        description="Pack the NVIDIA DALI installed here into parts of at most --part-mib "
                    "MiB for an offline machine; verify a kit; install one.",
        epilog="Example: fastres pack-dali --python 3.12 --out data/dali-kit; then, there: "
               "fastres pack-dali --install data/dali-kit --target data/dali && "
               "export PYTHONPATH=$PWD/data/dali")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", metavar="DIR", help="pack: write the parts and MANIFEST.json "
                      "into DIR (new or empty)")
    mode.add_argument("--verify", metavar="DIR", nargs="+",
                      help="check a kit's parts against its manifest; the manifest and the "
                           "parts may be spread over several folders")
    mode.add_argument("--install", metavar="DIR", nargs="+",
                      help="check a kit (in one folder or spread over several), then unpack "
                           "it into --target")
    mode.add_argument("--list", action="store_true", help="print what a pack would hold "
                      "(files and sizes by group) and exit; nothing is written")
    p.add_argument("--python", metavar="X.Y", help="pack: the target's Python (default: this "
                   "one, %d.%d)" % sys.version_info[:2])
    p.add_argument("--part-mib", type=float, default=PART_MIB,
                   help=f"pack: largest part in MiB (default {PART_MIB}: a part and a small "
                        f"repository fit one 64 MiB transfer)")
    p.add_argument("--level", type=int, default=9, choices=range(10), metavar="0-9",
                   help="pack: xz preset (default 9, as xz -9e; 0 packs many times faster "
                        "and ~20%% larger)")
    p.add_argument("--codecs", action=argparse.BooleanOptionalAction, default=None,
                   help="pack: include the image-codec and nvcomp libraries DALI's decoders "
                        "load (default: yes; the fastres loader needs none of them)")
    p.add_argument("--wheels", metavar="DIR", action="append", default=[],
                   help="pack: folder with wheels for the target Python (optree); without "
                        "one, a missing wheel is fetched with pip download")
    p.add_argument("--no-download", action="store_true",
                   help="pack: never run pip download; fail instead if a wheel is missing")
    p.add_argument("--target", metavar="T", help="install: folder to unpack into (new, empty, "
                   "or an earlier kit's install, which is replaced)")
    p.add_argument("--any-python", action="store_true",
                   help="install: unpack even if this Python is not the kit's")
    return p


# --------------------------------------------------------------------------- helpers

def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _py_tag(version: str) -> tuple[str, str]:
    """'3.12' -> ('3.12', '312'); KitError for anything else."""
    m = re.fullmatch(r"3\.(\d{1,2})(t?)", version.strip())
    if not m:
        raise KitError(f"--python: expected a version such as 3.12, got {version!r}")
    return f"3.{m.group(1)}{m.group(2)}", f"3{m.group(1)}{m.group(2)}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Entry:
    """One file of the kit: its path inside the kit and where its bytes come from (a file
    here, or bytes from a wheel or written by the packer)."""

    arcname: str
    group: str
    source: Path | None = None
    data: bytes | None = None
    mode: int = 0o644

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.source.stat().st_size


def _dali_site() -> tuple[Path, md.Distribution]:
    """(site-packages folder holding nvidia/dali, DALI's distribution)."""
    try:
        spec = importlib.util.find_spec("nvidia.dali")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise KitError("NVIDIA DALI is not installed in this environment; install it first "
                       "(pip install 'fastres[dali]') and pack from here")
    dali_dir = Path(list(spec.submodule_search_locations)[0])
    site = dali_dir.parent.parent
    for dist in md.distributions(path=[str(site)]):
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali") and dist.read_text("top_level.txt") is not None:
            return site, dist
    raise KitError(f"found {dali_dir} but no nvidia-dali-* distribution metadata beside it")


def _skip_ext(name: str, tag: str) -> bool:
    """True for a compiled module built for a Python other than `tag` ('312')."""
    m = _EXT_RE.search(name)
    return bool(m) and m.group(1) != tag


def _walk(root: Path, arc_root: str, group: str, tag: str, *,
          skip_dirs: tuple[str, ...] = (), skip_suffixes: tuple[str, ...] = ()) -> list[Entry]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                             and str(rel / d) not in skip_dirs)
        for fname in sorted(filenames):
            path = Path(dirpath) / fname
            if path.is_symlink() or fname.endswith((".pyc", *skip_suffixes)):
                continue
            if _skip_ext(fname, tag):
                continue
            mode = 0o755 if os.access(path, os.X_OK) else 0o644
            out.append(Entry(str(PurePosixPath(arc_root) / rel.as_posix() / fname), group,
                             source=path, mode=mode))
    return out


def _dist_metadata(dist: md.Distribution, group: str) -> list[Entry]:
    """METADATA, WHEEL and top_level.txt of a distribution (RECORD would list files the kit
    leaves out), plus INSTALLER, so importlib.metadata finds the version."""
    info = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info"
    out = []
    for name in ("METADATA", "WHEEL", "top_level.txt"):
        text = dist.read_text(name)
        if text is not None:
            out.append(Entry(f"{info}/{name}", group, data=text.encode()))
    out.append(Entry(f"{info}/INSTALLER", group, data=b"fastres pack-dali\n"))
    return out


def _find_wheel(name: str, version: str, tag: str, dirs: list[Path]) -> Path | None:
    norm = name.replace("-", "_").lower()
    for d in dirs:
        for whl in sorted(d.glob("*.whl")):
            parts = whl.name[:-4].split("-")
            if len(parts) < 5 or parts[0].lower() != norm or parts[1] != version:
                continue
            pys, abis, plats = parts[-3].split("."), parts[-2].split("."), parts[-1]
            if ("x86_64" in plats and "linux" in plats
                    and (f"cp{tag}" in pys and f"cp{tag}" in abis
                         or "abi3" in abis and any(p.startswith("cp3") and int(p[3:]) <= int(
                             tag.rstrip("t")[1:]) for p in pys))):
                return whl
    return None


def _download_wheel(name: str, version: str, pyver: str, dest: Path) -> Path:
    """pip download one binary wheel for the target Python (manylinux x86-64)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", pyver, "--implementation", "cp", "-d", str(dest),
           *[a for n in (17, 24, 27, 28, 31, 34) for a in ("--platform",
                                                            f"manylinux_2_{n}_x86_64")],
           "--platform", "manylinux2014_x86_64", f"{name}=={version}"]
    print(f"fetching {name} {version} for Python {pyver}: {' '.join(cmd[1:4])} ... "
          f"{name}=={version}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    whl = _find_wheel(name, version, pyver.replace(".", ""), [dest])
    if proc.returncode != 0 or whl is None:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise KitError(f"no {name} {version} wheel for Python {pyver} (pip download failed: "
                       f"{last[0]}); download one and pass its folder with --wheels")
    return whl


def _wheel_entries(whl: Path, group: str) -> list[Entry]:
    out = []
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if info.is_dir() or info.filename.endswith(".dist-info/RECORD"):
                continue
            if ".data/" in info.filename.split("/", 1)[0] + "/":
                raise KitError(f"{whl.name} has a .data folder; the kit cannot place it")
            mode = (info.external_attr >> 16) & 0o777 or 0o644
            out.append(Entry(info.filename, group, data=z.read(info), mode=mode))
    return out


def collect(pyver: str, *, codecs: bool = True, wheel_dirs: list[Path] = (),
            download: bool = True, tmp: Path | None = None) -> tuple[list[Entry], dict]:
    """Every file of a kit for Python `pyver`, and facts for the manifest."""
    pyver, tag = _py_tag(pyver)
    site, dist = _dali_site()
    dali = site / "nvidia" / "dali"
    have = sorted({m.group(1) for f in dali.iterdir() if (m := _EXT_RE.search(f.name))
                   and f.name.startswith("backend_impl.")})
    if tag not in have:
        raise KitError(f"DALI {dist.version} here has no backend for Python {pyver}; it has "
                       f"{', '.join('3.' + t[1:] for t in have)}")
    entries = _walk(dali, "nvidia/dali", "dali", tag, skip_dirs=("include",))
    ns = site / "nvidia" / "__init__.py"
    entries.append(Entry("nvidia/__init__.py", "dali", source=ns) if ns.exists() else
                   Entry("nvidia/__init__.py", "dali",
                         data=b"__path__ = __import__('pkgutil').extend_path(__path__, "
                              b"__name__)\n"))
    entries += _dist_metadata(dist, "dali")
    this_tag = "%d%d" % sys.version_info[:2]
    wheels = {}
    for name in PY_DEPS:
        try:
            dep = md.distribution(name)
        except md.PackageNotFoundError:
            raise KitError(f"{name} (imported by DALI) is not installed here: pip install "
                           f"{name}") from None
        files = [f for f in (dep.files or []) if ".dist-info/" not in str(f)
                 and not str(f).startswith("..") and "__pycache__" not in str(f)]
        compiled = any(_EXT_RE.search(str(f)) for f in files)
        if compiled and tag != this_tag:
            whl = _find_wheel(name, dep.version, tag, list(wheel_dirs))
            if whl is None:
                if not download:
                    raise KitError(f"no {name} {dep.version} wheel for Python {pyver} in "
                                   f"--wheels ({', '.join(map(str, wheel_dirs)) or 'none'})")
                whl = _download_wheel(name, dep.version, pyver, tmp or Path(tempfile.mkdtemp()))
            entries += _wheel_entries(whl, f"dep:{name}")
            wheels[name] = {"wheel": whl.name, "sha256": _sha256_file(whl)}
            continue
        for f in sorted(files, key=str):
            path = Path(dep.locate_file(f))
            if path.is_file() and not str(f).endswith(".pyc") and not _skip_ext(path.name, tag):
                entries.append(Entry(str(PurePosixPath(*Path(str(f)).parts)), f"dep:{name}",
                                     source=path,
                                     mode=0o755 if os.access(path, os.X_OK) else 0o644))
        entries += _dist_metadata(dep, f"dep:{name}")
    if codecs:
        for d in CODEC_DIRS:
            root = site / "nvidia" / d
            if not root.is_dir():
                raise KitError(f"codecs: {root} is missing (DALI's pip install brings it; "
                               f"or pack with --no-codecs)")
            entries += _walk(root, f"nvidia/{d}", f"codec:{d}", tag,
                             skip_dirs=("include", "bin", "lib64/cmake", "tools"),
                             skip_suffixes=(".a", ".h"))
        jpeg = sorted((site / "nvidia").glob(f"*/lib/{NVJPEG}.*"))
        if not jpeg:
            raise KitError(f"codecs: no {NVJPEG}.* under {site / 'nvidia'} (pip install "
                           f"nvidia-nvjpeg, or pack with --no-codecs)")
        # nvjpeg goes where its cu13 wheel puts it, nvidia/cu13/lib: both DALI's RUNPATH
        # ($ORIGIN/../cu13/lib) and nvimgcodec's extensions' ($ORIGIN/../../cu13/lib) look
        # there. torch finds its own CUDA libraries by name on sys.path, past this folder.
        entries += [Entry(f"nvidia/cu13/lib/{j.name}", "codec:nvjpeg", source=j, mode=0o755)
                    for j in jpeg]
    seen = set()
    for e in entries:
        if e.arcname in seen:
            raise KitError(f"two files would land on {e.arcname}")
        seen.add(e.arcname)
    facts = {"dali": dist.metadata["Name"], "dali_version": dist.version, "python": pyver,
             "abi": f"cpython-{tag}", "platform": PLATFORM_TAG, "codecs": codecs,
             "deps": {name: md.version(name) for name in PY_DEPS}, "wheels": wheels,
             "source": str(site)}
    return entries, facts


# --------------------------------------------------------------------------- pack

class _PartWriter:
    """A write-only stream cut into files of at most `part_bytes`, hashing each part and
    the whole as the bytes pass."""

    def __init__(self, out: Path, stem: str, part_bytes: int):
        self.out, self.stem, self.part_bytes = out, stem, part_bytes
        self.parts: list[dict] = []
        self.whole = hashlib.sha256()
        self.total = 0
        self._f = None

    def _open(self) -> None:
        name = f"{self.stem}.{len(self.parts) + 1:03d}"
        self._f = open(self.out / name, "wb")
        self.parts.append({"name": name, "bytes": 0, "_h": hashlib.sha256()})

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._f is None or self.parts[-1]["bytes"] == self.part_bytes:
                self._finish()
                self._open()
            part = self.parts[-1]
            chunk = view[: self.part_bytes - part["bytes"]]
            self._f.write(chunk)
            part["_h"].update(chunk)
            self.whole.update(chunk)
            part["bytes"] += len(chunk)
            self.total += len(chunk)
            view = view[len(chunk):]
        return len(data)

    def _finish(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            part = self.parts[-1]
            part["sha256"] = part.pop("_h").hexdigest()

    def close(self) -> None:
        self._finish()


class _XzWriter:
    """Compresses what tarfile writes (stream mode) into the part writer."""

    def __init__(self, sink: _PartWriter, level: int):
        self.sink = sink
        # 9 is "9e" (xz -9e: slower, ~1% smaller); 'extreme' on low presets only slows
        # them (preset 0e packs ~5x slower than 0 here), so they stay plain.
        self.comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                        preset=level | (lzma.PRESET_EXTREME if level == 9
                                                        else 0))

    def write(self, data) -> int:
        out = self.comp.compress(data)
        if out:
            self.sink.write(out)
        return len(data)

    def close(self) -> None:
        self.sink.write(self.comp.flush())


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.arcname)
    info.size = e.size
    info.mode = e.mode
    # Fixed owner and time: the same inputs give the same bytes.
    info.mtime = 0 if e.data is not None else int(e.source.stat().st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(out: Path, pyver: str, *, part_mib: float = PART_MIB, level: int = 9,
         codecs: bool = True, wheel_dirs: list[Path] = (), download: bool = True) -> dict:
    """Write a kit of the DALI installed here for Python `pyver` into `out`; returns the
    manifest."""
    if part_mib < 1:
        raise KitError(f"--part-mib must be at least 1, got {part_mib:g}")
    _check_out(out)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        entries, facts = collect(pyver, codecs=codecs, wheel_dirs=list(wheel_dirs),
                                 download=download, tmp=Path(tmp))
        stem = f"dali-{facts['dali_version']}-cp{facts['abi'].split('-')[1]}.tar.xz"
        return write_kit(out, stem, entries, facts, part_bytes=int(part_mib * 2**20),
                         level=level, t0=t0)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KitError(f"{out} exists and is not an empty folder; choose a new one")


def write_kit(out: Path, stem: str, entries: list[Entry], facts: dict, *, part_bytes: int,
              level: int = 9, t0: float | None = None) -> dict:
    """Tar `entries`, xz-compress, cut into parts of at most `part_bytes` named
    STEM.001, ...; write MANIFEST.json last (a folder with one is a finished kit)."""
    t0 = time.perf_counter() if t0 is None else t0
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    sink = _PartWriter(out, stem, part_bytes)
    xz = _XzWriter(sink, level)
    try:
        with tarfile.open(fileobj=xz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for e in entries:
                if e.data is not None:
                    tar.addfile(_tarinfo(e), io.BytesIO(e.data))
                else:
                    with open(e.source, "rb") as f:
                        tar.addfile(_tarinfo(e), f)
        xz.close()
    finally:
        sink.close()
    groups: dict[str, dict] = {}
    for e in entries:
        g = groups.setdefault(e.group, {"files": 0, "bytes": 0})
        g["files"] += 1
        g["bytes"] += e.size
    manifest = {
        "format": KIT_FORMAT, "kind": "fastres DALI kit", **facts,
        "compression": f"xz (LZMA2 preset {level}{'e' if level == 9 else ''})",
        "part_bytes_max": part_bytes,
        "parts": sink.parts,
        "whole": {"name": stem, "bytes": sink.total, "sha256": sink.whole.hexdigest()},
        "files": len(entries), "unpacked_bytes": sum(e.size for e in entries),
        "groups": dict(sorted(groups.items())),
        "made": {"python": platform.python_version(),
                 "seconds": round(time.perf_counter() - t0, 1),
                 "date": time.strftime("%Y-%m-%d", time.gmtime())},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# --------------------------------------------------------------------------- verify, install

def _as_folders(kit) -> list[Path]:
    """One folder or several, as a list of Paths."""
    if isinstance(kit, (str, os.PathLike)):
        return [Path(kit)]
    folders = [Path(k) for k in kit]
    if not folders:
        raise KitError("name at least one kit folder")
    return folders


def read_manifest(kit) -> dict:
    """The kit's manifest, from the one folder (of `kit`: a folder or several) that holds
    MANIFEST.json; several copies must be identical."""
    folders = _as_folders(kit)
    for f in folders:
        if not f.is_dir():
            raise KitError(f"{f} is not a folder; give the folder(s) that hold {MANIFEST} "
                           f"and the parts")
    found = [f / MANIFEST for f in folders if (f / MANIFEST).is_file()]
    where = folders[0] if len(folders) == 1 else f"any of {', '.join(map(str, folders))}"
    if not found:
        raise KitError(f"{where} has no {MANIFEST}: not a kit folder (make one with fastres "
                       f"pack-dali --out DIR, and copy {MANIFEST} with the parts)")
    texts = {p: p.read_bytes() for p in found}
    if len(set(texts.values())) > 1:
        raise KitError(f"{len(found)} different {MANIFEST} files ({', '.join(map(str, found))}): "
                       f"parts of two kits? keep the one that came with these parts")
    path = found[0]
    try:
        m = json.loads(texts[path])
        if m.get("format") != KIT_FORMAT:
            raise KitError(f"{path}: kit format {m.get('format')!r}, this fastres reads "
                           f"{KIT_FORMAT}")
        m["parts"][0]["sha256"], m["whole"]["sha256"]  # noqa: B018 (shape check)
        names = [p["name"] for p in m["parts"]]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise KitError(f"{path} is not a readable kit manifest ({type(e).__name__}: {e})") \
            from None
    if len(set(names)) != len(names):
        raise KitError(f"{path} lists a part twice: not a manifest pack-dali wrote")
    return m


def locate_parts(kit, m: dict) -> dict[str, Path]:
    """Where each of the manifest's parts is among the kit's folders. One KitError names
    every missing part, a part found in two folders (with each copy's size against the
    manifest), or a file that looks like a part of this kit but is not in its manifest."""
    folders = _as_folders(kit)
    stem = m["whole"]["name"]
    want = {p["name"]: p for p in m["parts"]}
    seen: dict[str, list[Path]] = {}
    stray = []
    for f in dict.fromkeys(folder.resolve() for folder in folders):
        for path in sorted(f.iterdir()):
            if path.name in want and path.is_file():
                seen.setdefault(path.name, []).append(path)
            elif re.fullmatch(re.escape(stem) + r"\.\d{3,}", path.name):
                stray.append(path)
    missing = [n for n in want if n not in seen]
    if missing:
        searched = ", ".join(map(str, folders))
        raise KitError(f"{len(missing)} of {len(want)} parts missing in {searched}: "
                       f"{', '.join(missing)}; copy them into "
                       f"{'that folder' if len(folders) == 1 else 'one of these folders'}")
    twice = {n: ps for n, ps in seen.items() if len(ps) > 1}
    if twice:
        n, ps = next(iter(twice.items()))
        copies = "; ".join(f"{p} ({p.stat().st_size} bytes)" for p in ps)
        raise KitError(f"part {n} is in {len(ps)} folders: {copies}; the manifest says "
                       f"{want[n]['bytes']} bytes; keep one copy"
                       + (f" ({len(twice) - 1} more parts are duplicated)" if len(twice) > 1
                          else ""))
    if stray:
        raise KitError(f"{stray[0]} is not a part of this kit's manifest ({len(want)} parts): "
                       f"a part of another kit with the same name? remove it")
    return {n: seen[n][0] for n in want}


def verify(kit, log=print) -> dict:
    """Check every part's presence (in the kit's folder, or in any of several), size and
    SHA-256, and the whole's; return the manifest with `paths` (part name -> file) added.
    One KitError names every missing part, a duplicated one, or the first corrupt one."""
    m = read_manifest(kit)
    paths = locate_parts(kit, m)
    parts = m["parts"]
    for p in parts:
        size = paths[p["name"]].stat().st_size
        if size != p["bytes"]:
            raise KitError(f"part {paths[p['name']]} is {size} bytes, the manifest says "
                           f"{p['bytes']}: copy it again (truncated or from another kit)")
    whole = hashlib.sha256()
    for p in parts:
        h = hashlib.sha256()
        with open(paths[p["name"]], "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
                whole.update(chunk)
        if h.hexdigest() != p["sha256"]:
            raise KitError(f"part {p['name']} is corrupt (sha256 {h.hexdigest()[:16]}..., "
                           f"expected {p['sha256'][:16]}...; {paths[p['name']]}): copy it "
                           f"again")
        log(f"  ok  {p['name']}  {_mib(p['bytes'])}  sha256 {p['sha256'][:16]}"
            + (f"  ({paths[p['name']].parent})" if len(_as_folders(kit)) > 1 else ""))
    if whole.hexdigest() != m["whole"]["sha256"]:
        raise KitError(f"the parts are each intact but together hash to "
                       f"{whole.hexdigest()[:16]}..., not {m['whole']['sha256'][:16]}...: "
                       f"parts from two different kits?")
    return {**m, "paths": paths}


class _Concat(io.RawIOBase):
    """The parts read back to back as one stream."""

    def __init__(self, paths: list[Path]):
        self._paths = list(paths)
        self._f = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            if self._f is None:
                if not self._paths:
                    return 0
                self._f = open(self._paths.pop(0), "rb")
            n = self._f.readinto(buf)
            if n:
                return n
            self._f.close()
            self._f = None

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        super().close()


def install(kit, target: Path, *, any_python: bool = False, log=print) -> dict:
    """Verify `kit` (a folder, or several folders that hold the manifest and the parts
    between them), then unpack it into `target` (staged, then moved in)."""
    m = verify(kit, log=log)
    here = "%d.%d" % sys.version_info[:2]
    if m["python"] != here and not any_python:
        raise KitError(f"this kit is for Python {m['python']} ({m['abi']}), this is Python "
                       f"{here}: run the install with that Python, or pack a kit with "
                       f"--python {here}")
    if platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        raise KitError(f"the kit holds {m['platform']} libraries; this is "
                       f"{sys.platform} {platform.machine()}")
    if target.exists() and not target.is_dir():
        raise KitError(f"--target {target} exists and is not a folder")
    target.mkdir(parents=True, exist_ok=True)
    for left in target.glob(".staging-*"):  # what a killed install left: never the kit
        shutil.rmtree(left, ignore_errors=True)
    existing = [p for p in target.iterdir() if p.name not in (MARKER, INSTALLING)]
    if existing and not ((target / MARKER).is_file() or (target / INSTALLING).is_file()):
        raise KitError(f"--target {target} is not empty and holds no earlier kit "
                       f"({existing[0].name}, ...); give a new or empty folder")
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
    try:
        stream = io.BufferedReader(_Concat([m["paths"][p["name"]] for p in m["parts"]]),
                                   buffer_size=_CHUNK)
        with tarfile.open(fileobj=stream, mode="r|xz") as tar:
            if hasattr(tarfile, "data_filter"):      # 3.12, and 3.11.4+ / 3.10.12+
                tar.extractall(staging, filter="data")
            else:                                    # older: check names ourselves
                for member in tar:
                    name = PurePosixPath(member.name)
                    if name.is_absolute() or ".." in name.parts or not (
                            member.isfile() or member.isdir()):
                        raise KitError(f"refusing kit member {member.name!r}")
                    tar.extract(member, staging)
        # From here the folder holds a kit being replaced: a kill leaves INSTALLING behind,
        # and the next install takes the folder as a kit's (and replaces it whole).
        (target / INSTALLING).write_text("an install of the DALI kit started here\n")
        for old in existing:                          # an earlier kit: replaced whole
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        for item in staging.iterdir():
            os.replace(item, target / item.name)
    except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
        raise KitError(f"unpacking the kit failed ({type(e).__name__}: {e}); verify passed, "
                       f"so the kit was made broken: pack it again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (target / MARKER).write_text(json.dumps({k: m[k] for k in (
        "dali", "dali_version", "python", "abi", "codecs", "whole", "files",
        "unpacked_bytes")}, indent=1) + "\n")
    (target / INSTALLING).unlink(missing_ok=True)
    return m


# --------------------------------------------------------------------------- main

def _print_groups(groups: dict, total: int, files: int) -> None:
    for g, v in groups.items():
        print(f"  {g:<22} {v['files']:>5} files  {_mib(v['bytes']):>11}")
    print(f"  {'total':<22} {files:>5} files  {_mib(total):>11} unpacked")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.verify or args.install:
        if args.python or args.codecs is not None or args.wheels:
            raise KitError("--python, --codecs and --wheels are pack options; a kit's "
                           "manifest says what it holds")
    if args.verify:
        kit = [Path(d) for d in args.verify]
        print(f"verifying {', '.join(map(str, kit))}")
        m = verify(kit)
        print(f"kit ok: DALI {m['dali_version']} for Python {m['python']}, {len(m['parts'])} "
              f"parts, {_mib(m['whole']['bytes'])}, sha256 {m['whole']['sha256'][:16]}")
        return 0
    if args.install:
        if not args.target:
            raise KitError("--install needs --target T (the folder to unpack into; then "
                           "PYTHONPATH=T)")
        kit, target = [Path(d) for d in args.install], Path(args.target)
        t0 = time.perf_counter()
        print(f"installing {', '.join(map(str, kit))} into {target}")
        m = install(kit, target, any_python=args.any_python)
        print(f"installed DALI {m['dali_version']} (Python {m['python']}): {m['files']} files, "
              f"{_mib(m['unpacked_bytes'])} in {time.perf_counter() - t0:.1f} s; use it with "
              f"PYTHONPATH={target.resolve()}")
        return 0
    if args.target or args.any_python:
        raise KitError("--target and --any-python go with --install")
    pyver = args.python or "%d.%d" % sys.version_info[:2]
    wheel_dirs = [Path(d) for d in args.wheels]
    if args.list:
        entries, facts = collect(pyver, codecs=args.codecs is not False, wheel_dirs=wheel_dirs,
                                 download=not args.no_download)
        groups: dict[str, dict] = {}
        for e in entries:
            g = groups.setdefault(e.group, {"files": 0, "bytes": 0})
            g["files"] += 1
            g["bytes"] += e.size
        print(f"DALI {facts['dali_version']} for Python {facts['python']} from "
              f"{facts['source']}")
        _print_groups(dict(sorted(groups.items())), sum(e.size for e in entries),
                      len(entries))
        return 0
    out = Path(args.out)
    print(f"packing DALI for Python {pyver} into {out} (xz -{args.level}"
          f"{'e' if args.level == 9 else ''}, parts of at "
          f"most {args.part_mib:g} MiB)", flush=True)
    m = pack(out, pyver, part_mib=args.part_mib, level=args.level,
             codecs=args.codecs is not False, wheel_dirs=wheel_dirs,
             download=not args.no_download)
    _print_groups(m["groups"], m["unpacked_bytes"], m["files"])
    for p in m["parts"]:
        print(f"  {p['name']}  {_mib(p['bytes'])}  sha256 {p['sha256'][:16]}")
    print(f"packed {_mib(m['unpacked_bytes'])} into {len(m['parts'])} parts, "
          f"{_mib(m['whole']['bytes'])} ({m['whole']['bytes'] / m['unpacked_bytes']:.1%}) in "
          f"{m['made']['seconds']:.0f} s; manifest {out / MANIFEST}")
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("pack-dali", main))
