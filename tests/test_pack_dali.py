"""`fastres pack-dali`: pack -> verify -> install -> import, and the kit's failure modes.

The round trip packs the DALI installed here for this Python (the target Python is a
parameter: the GPU machines run 3.12, this one may not), installs it into a fresh folder
and imports it in a fresh process that must map every nvidia library from the installed
copy, not from site-packages, and run a CPU pipeline. The error cases use a tiny kit
written by the same code, so they run in a second.
"""
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fastres.tools.gpu_kit import pack_dali as pk
from fastres.tools.cli import run_tool

PY = "%d.%d" % sys.version_info[:2]


def one_line_error(capsys, argv, needle: str) -> str:
    assert run_tool("pack-dali", pk.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastres pack-dali: error:"), err
    assert needle in err[0], err[0]
    return err[0]


# --------------------------------------------------------------------------- a tiny kit

@pytest.fixture
def tiny_kit(tmp_path) -> Path:
    """A kit of three small files (~6 KB of random bytes: xz cannot shrink them) in parts
    of 2 KiB."""
    rng = random.Random(0)
    files = {"nvidia/__init__.py": b"__path__ = __import__('pkgutil').extend_path(__path__, "
                                   b"__name__)\n",
             "nvidia/fake/__init__.py": b"VALUE = 42\n",
             "nvidia/fake/blob.bin": bytes(rng.getrandbits(8) for _ in range(6000))}
    entries = [pk.Entry(k, "fake", data=v) for k, v in files.items()]
    facts = {"dali": "fake", "dali_version": "0.0", "python": PY,
             "abi": f"cpython-{PY.replace('.', '')}", "platform": pk.PLATFORM_TAG,
             "codecs": False, "deps": {}, "wheels": {}, "source": "test"}
    kit = tmp_path / "kit"
    m = pk.write_kit(kit, "fake.tar.xz", entries, facts, part_bytes=2048, level=0)
    assert len(m["parts"]) >= 3 and all(p["bytes"] <= 2048 for p in m["parts"])
    return kit


def test_tiny_kit_verifies_and_installs(tiny_kit, tmp_path, capsys):
    assert pk.main(["--verify", str(tiny_kit)]) == 0
    assert "kit ok" in capsys.readouterr().out
    target = tmp_path / "site"
    assert pk.main(["--install", str(tiny_kit), "--target", str(target)]) == 0
    assert (target / "nvidia/fake/__init__.py").read_text() == "VALUE = 42\n"
    assert (target / pk.MARKER).is_file()
    assert not [p for p in target.iterdir() if p.name.startswith(".staging")]
    # The whole's hash in the manifest is the hash of the parts back to back.
    m = json.loads((tiny_kit / pk.MANIFEST).read_text())
    whole = hashlib.sha256(b"".join((tiny_kit / p["name"]).read_bytes() for p in m["parts"]))
    assert whole.hexdigest() == m["whole"]["sha256"]
    # Installing again replaces the earlier kit's files (and only those).
    (target / "nvidia/fake/stale.py").write_text("x")
    assert pk.main(["--install", str(tiny_kit), "--target", str(target)]) == 0
    assert not (target / "nvidia/fake/stale.py").exists()
    assert not (target / pk.INSTALLING).exists()


@pytest.mark.parametrize("killed", ["while unpacking", "while replacing"])
def test_an_install_killed_midway_can_be_run_again(tiny_kit, tmp_path, killed):
    """A kill leaves a staging folder (unpacking) or a half-replaced kit with the
    in-progress note (replacing): the same command then installs, it does not refuse."""
    target = tmp_path / "site"
    target.mkdir()
    (target / ".staging-abc123" / "nvidia").mkdir(parents=True)
    if killed == "while replacing":
        (target / pk.INSTALLING).write_text("")
        (target / "nvidia").mkdir()
    assert pk.main(["--install", str(tiny_kit), "--target", str(target)]) == 0
    assert (target / "nvidia/fake/__init__.py").read_text() == "VALUE = 42\n"
    assert sorted(p.name for p in target.iterdir() if p.name.startswith(".")) == [pk.MARKER]


def test_missing_parts_are_named(tiny_kit, capsys):
    m = json.loads((tiny_kit / pk.MANIFEST).read_text())
    (tiny_kit / m["parts"][1]["name"]).unlink()
    (tiny_kit / m["parts"][2]["name"]).unlink()
    err = one_line_error(capsys, ["--verify", str(tiny_kit)], "2 of")
    assert m["parts"][1]["name"] in err and m["parts"][2]["name"] in err


def test_corrupt_part(tiny_kit, tmp_path, capsys):
    m = json.loads((tiny_kit / pk.MANIFEST).read_text())
    part = tiny_kit / m["parts"][0]["name"]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    one_line_error(capsys, ["--verify", str(tiny_kit)], f"part {part.name} is corrupt")
    # --install checks before it writes anything.
    target = tmp_path / "t"
    one_line_error(capsys, ["--install", str(tiny_kit), "--target", str(target)], "corrupt")
    assert not target.exists() or not any(target.iterdir())


def test_truncated_and_swapped_parts(tiny_kit, capsys):
    m = json.loads((tiny_kit / pk.MANIFEST).read_text())
    a, b = (tiny_kit / m["parts"][i]["name"] for i in (0, 1))
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(da[:-1])
    one_line_error(capsys, ["--verify", str(tiny_kit)], "copy it again")
    a.write_bytes(db)                      # same size, wrong content
    b.write_bytes(da)
    one_line_error(capsys, ["--verify", str(tiny_kit)], "corrupt")


def test_not_a_kit(tmp_path, capsys):
    one_line_error(capsys, ["--verify", str(tmp_path)], "no MANIFEST.json")
    one_line_error(capsys, ["--verify", str(tmp_path / "nope")], "not a folder")
    (tmp_path / pk.MANIFEST).write_text("{not json")
    one_line_error(capsys, ["--verify", str(tmp_path)], "not a readable kit manifest")


def test_install_refusals(tiny_kit, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    one_line_error(capsys, ["--install", str(tiny_kit), "--target", str(busy)], "not empty")
    assert (busy / "mine.txt").read_text() == "keep me"
    one_line_error(capsys, ["--install", str(tiny_kit)], "--install needs --target")
    m = json.loads((tiny_kit / pk.MANIFEST).read_text())
    m["python"] = "3.99"
    (tiny_kit / pk.MANIFEST).write_text(json.dumps(m))
    one_line_error(capsys, ["--install", str(tiny_kit), "--target", str(tmp_path / "t")],
                   "this kit is for Python 3.99")


def test_pack_refuses_a_used_folder(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    one_line_error(capsys, ["--python", PY, "--out", str(tmp_path)], "not an empty folder")


# --------------------------------------------------------------------------- parts in several folders

def spread(kit: Path, tmp_path: Path, n: int = 3) -> list[Path]:
    """Move the kit's manifest and parts into n folders, round robin (as n transfers
    would leave them)."""
    folders = [tmp_path / f"t{i}" for i in range(n)]
    for f in folders:
        f.mkdir()
    m = json.loads((kit / pk.MANIFEST).read_text())
    (kit / pk.MANIFEST).rename(folders[-1] / pk.MANIFEST)
    for i, p in enumerate(m["parts"]):
        (kit / p["name"]).rename(folders[i % n] / p["name"])
    return folders


def test_install_from_several_folders(tiny_kit, tmp_path, capsys):
    folders = spread(tiny_kit, tmp_path)
    assert all(any(f.iterdir()) for f in folders)
    argv = [str(f) for f in folders]
    assert pk.main(["--verify", *argv]) == 0
    assert "kit ok" in capsys.readouterr().out
    target = tmp_path / "site"
    assert pk.main(["--install", *argv, "--target", str(target)]) == 0
    assert (target / "nvidia/fake/__init__.py").read_text() == "VALUE = 42\n"
    # The same folder named twice, and a second identical manifest, change nothing.
    (folders[0] / pk.MANIFEST).write_bytes((folders[-1] / pk.MANIFEST).read_bytes())
    assert pk.main(["--verify", *argv, argv[0]]) == 0
    # One folder alone lacks parts: every missing one is named, with where it looked.
    err = one_line_error(capsys, ["--verify", argv[-1]], "parts missing in")
    m = json.loads((folders[-1] / pk.MANIFEST).read_text())
    assert m["parts"][0]["name"] in err and m["parts"][2]["name"] not in err


def test_several_folders_refusals(tiny_kit, tmp_path, capsys):
    folders = spread(tiny_kit, tmp_path)
    argv = [str(f) for f in folders]
    m = json.loads((folders[-1] / pk.MANIFEST).read_text())
    first = m["parts"][0]["name"]
    # A part in two folders (an old truncated copy beside a good one): both named.
    good = folders[0] / first
    (folders[1] / first).write_bytes(good.read_bytes()[:-5])
    err = one_line_error(capsys, ["--verify", *argv], f"part {first} is in 2 folders")
    assert str(folders[1].resolve()) in err and "keep one copy" in err
    (folders[1] / first).unlink()
    # A corrupt part in another folder than the manifest's: its path is named.
    data = bytearray(good.read_bytes())
    data[7] ^= 1
    good.write_bytes(bytes(data))
    target = tmp_path / "site"
    err = one_line_error(capsys, ["--install", *argv, "--target", str(target)], "corrupt")
    assert str(good.resolve()) in err
    assert not target.exists() or not any(target.iterdir())
    data[7] ^= 1
    good.write_bytes(bytes(data))
    # A part of this kit's name that its manifest does not list.
    stray = folders[1] / (m["whole"]["name"] + ".999")
    stray.write_bytes(b"x")
    one_line_error(capsys, ["--verify", *argv], "is not a part of this kit's manifest")
    stray.unlink()
    # Two different manifests.
    other = dict(m, made={"python": "0", "seconds": 0, "date": "x"})
    (folders[0] / pk.MANIFEST).write_text(json.dumps(other))
    one_line_error(capsys, ["--verify", *argv], "2 different MANIFEST.json files")
    (folders[0] / pk.MANIFEST).unlink()
    # No manifest anywhere; a folder that does not exist.
    one_line_error(capsys, ["--verify", argv[0], argv[1]], "has no MANIFEST.json")
    one_line_error(capsys, ["--verify", *argv, str(tmp_path / "nope")], "not a folder")
    assert pk.main(["--verify", *argv]) == 0


# --------------------------------------------------------------------------- the real DALI

def test_list_and_unknown_python(capsys):
    pytest.importorskip("nvidia.dali")
    assert pk.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "dali " in out and "dep:optree" in out and "unpacked" in out
    assert "codec:nvimgcodec" in out
    one_line_error(capsys, ["--list", "--python", "3.99"], "no backend for Python 3.99")
    one_line_error(capsys, ["--list", "--python", "twelve"], "expected a version")


def test_kit_leaves_out_headers_and_other_pythons():
    pytest.importorskip("nvidia.dali")
    entries, facts = pk.collect(PY, codecs=False)
    names = [e.arcname for e in entries]
    tag = PY.replace(".", "")
    assert f"nvidia/dali/backend_impl.cpython-{tag}-x86_64-linux-gnu.so" in names
    assert not [n for n in names if "/include/" in n or n.endswith(".pyc")]
    other = [n for n in names if "cpython-3" in n and f"cpython-{tag}-" not in n]
    assert not other, other[:3]
    assert "nvidia/__init__.py" in names and any(n.startswith("optree/") for n in names)
    assert not [n for n in names if n.startswith("nvidia/nvimgcodec/")]   # --no-codecs


# Not marked slow: 32 to 59 s on 2 busy cores (~30 s of CPU to pack 488 MB at xz -0); it
# writes ~650 MB under tmp_path.
def test_pack_verify_install_import(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("PIL")
    kit, target = tmp_path / "kit", tmp_path / "site"
    assert pk.main(["--python", PY, "--out", str(kit), "--level", "0", "--part-mib", "60"]) == 0
    m = json.loads((kit / pk.MANIFEST).read_text())
    assert len(m["parts"]) >= 2 and all(p["bytes"] <= 60 * 2**20 for p in m["parts"])
    assert pk.main(["--verify", str(kit)]) == 0
    assert pk.main(["--install", str(kit), "--target", str(target)]) == 0
    capsys.readouterr()
    # A fresh process: DALI must come from the kit (every nvidia library it maps), and a
    # CPU pipeline must give the right numbers.
    probe = textwrap.dedent("""
        import os, sys
        import numpy as np
        import nvidia.dali as dali
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        target = os.path.realpath(sys.argv[1])
        assert os.path.realpath(dali.__file__).startswith(target), dali.__file__
        pipe = Pipeline(batch_size=4, num_threads=1, device_id=None)
        with pipe:
            x = fn.external_source(name="x", layout="HWC", dtype=types.UINT8)
            pipe.set_outputs(fn.crop_mirror_normalize(
                x, crop=(32, 32), crop_pos_x=0.5, crop_pos_y=0.5, mirror=1,
                mean=[128.0] * 3, std=[64.0] * 3, output_layout="HWC"))
        pipe.build()
        img = np.random.default_rng(0).integers(0, 256, (4, 36, 36, 3), dtype=np.uint8)
        pipe.feed_input("x", img)
        (out,) = pipe.run()
        ref = (img[:, 2:34, 2:34][:, :, ::-1].astype(np.float32) - 128) / 64
        assert np.abs(np.array(out.as_tensor()) - ref).max() < 1e-5
        # The codec libraries: DALI's CPU decoder goes through nvimgcodec, which loads its
        # extensions, and through them nvjpeg, from where the kit put them.
        jpeg = np.fromfile(sys.argv[2], np.uint8)
        dec = Pipeline(batch_size=1, num_threads=1, device_id=None)
        with dec:
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            dec.set_outputs(fn.decoders.image(enc, device="cpu", output_type=types.RGB))
        dec.build()
        dec.feed_input("enc", [jpeg])
        (img,) = dec.run()
        np.save(sys.argv[3], np.array(img.at(0)))
        libs = {l.split()[-1] for l in open("/proc/self/maps") if "/nvidia/" in l and ".so" in l}
        outside = sorted(l for l in libs if not l.startswith(target))
        assert libs and not outside, outside
        names = " ".join(libs)
        assert "libnvimgcodec.so" in names and "libnvjpeg.so" in names, names
        print("OK", dali.__version__, len(libs))
    """)
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    (tmp_path / "x.jpg").write_bytes(buf.getvalue())
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", probe, str(target), str(tmp_path / "x.jpg"),
                           str(tmp_path / "x.npy")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("OK " + m["dali_version"])
    ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.int16)
    assert np.abs(np.load(tmp_path / "x.npy").astype(np.int16) - ref).max() <= 2


def test_codecs_land_where_dali_and_nvimgcodec_look():
    pytest.importorskip("nvidia.dali")
    try:
        entries, _ = pk.collect(PY, codecs=True)
    except pk.KitError as e:          # an environment without DALI's codec wheels
        pytest.skip(str(e))
    names = {e.arcname for e in entries}
    assert any(n.startswith("nvidia/cu13/lib/libnvjpeg.so") for n in names)
    assert any(n.startswith("nvidia/libnvcomp/lib64/libnvcomp.so") for n in names)
    impls = [n for n in names if n.startswith("nvidia/nvimgcodec/nvimgcodec_impl.")]
    assert impls == [f"nvidia/nvimgcodec/nvimgcodec_impl.cpython-{PY.replace('.', '')}"
                     f"-x86_64-linux-gnu.so"]
    assert not [n for n in names if "/include/" in n or n.endswith((".h", ".a"))]
