"""`fastres loader-parity`: does the DALI loader give what the tensor loader gives?

    fastres loader-parity                          # GPU if present: DALI's GPU operators
    fastres loader-parity --device cpu --images 512 --batch-size 64 --json parity.json

Both loaders consume the same epoch plan (fastres.pipelines.base.plan_epoch), so for one
(seed, epoch, rank) they must return the same batches. Equal batches alone would not show
that either one augments as documented, so the images are made to be read back: every
pixel carries its source row (red = 7 row + 3), its source column (green = 7 col + 3) and
the image's index (blue: the low byte in the top half, the high byte in the bottom half),
and the label is index mod 10. From each output image, un-normalised, the check recovers
the crop offsets, the flip and the index, rebuilds the image those imply from the padded
source, and compares every pixel. Per case (an augmentation setting) and loader:

  same batches   DALI minus tensor, at float32 and at the training dtype (max |diff|),
                 labels identical
  labels         label == index mod 10 for every image
  epochs         each epoch visits distinct images, as many as the loader promises
  pixels         every pixel (outside cutout) equals the rebuilt image: padding mode,
                 crop window, flip direction, channel order (with colour jitter, after
                 undoing each image's (x + b) * c with the epoch plan's b and c)
  normalisation  un-normalised values are whole numbers (max distance to the nearest)
  crop           offsets uniform over [0, 2 pad] (chi-square, p = 0.001)
  flips          random: half flipped (|z| < 4.5); alternate: each image flipped in every
                 other epoch
  cutout         zeroed boxes no larger than the cutout side; DALI's and the tensor
                 loader's counts and areas equal
  channels       per-channel mean and std of all batches, DALI against tensor

The decoder is integer arithmetic after one rounding, so it reads the same on every
device (a float decode mis-read flipped images on a GPU, whose division by a constant is a
multiplication by a float32 reciprocal: issue 20). Without a GPU the output says what it
did not check: DALI's GPU operators and its GPU feed.

Exit status 0 when every check passes, 1 when one fails (2 for bad arguments).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

from fastres.tools._common import int_at_least

# Augmentation settings checked, by name: the speed-run's (translate 2, reflect,
# alternating flips), hiverge's (the same with colour jitter), the paper's (zero-padded
# crop 4, random flips), and cutout.
CASES = {
    "speedrun": dict(crop="translate", pad=2, pad_mode="reflect", flip="alternate", cutout=0),
    "jitter": dict(crop="translate", pad=2, pad_mode="reflect", flip="alternate", cutout=0,
                   brightness=0.1399, contrast=0.1308),
    "paper": dict(crop="pad_crop", pad=4, pad_mode="zeros", flip="random", cutout=0),
    "cutout": dict(crop="pad_crop", pad=4, pad_mode="reflect", flip="random", cutout=8),
}
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
HW = 32
# Largest |DALI - tensor| accepted per output dtype: both compute x * scale + shift in
# float32 and round once, but DALI's (x - mean) / std arithmetic may differ in the last bit.
TOL = {"float32": 1e-5, "bfloat16": 1.6e-2, "float16": 2e-3}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres loader-parity",
        description="Check that the DALI loader returns the tensor loader's batches, and "
                    "that both augment as documented (crop, flips, labels, normalisation, "
                    "cutout), on images built to be read back.",
        epilog="Exit status: 0 all checks pass, 1 a check failed, 2 bad arguments.")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda[:N]")
    p.add_argument("--images", type=int_at_least(0), default=0,
                   help="synthetic images (0 = auto: 25000 on GPU, 1024 on CPU; at most 65536)")
    p.add_argument("--batch-size", type=int_at_least(0), default=0,
                   help="batch size (0 = auto: 1000 on GPU, 128 on CPU)")
    p.add_argument("--epochs", type=int_at_least(1), default=2, help="epochs per case (default 2: the "
                   "alternate flip needs two)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma-separated augmentation settings from {', '.join(CASES)}")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="training dtype for the second same-batches pass (auto: bf16 on GPU, "
                        "fp32 on CPU)")
    p.add_argument("--dali-threads", type=int_at_least(1), default=4, help="DALI CPU threads")
    p.add_argument("--seed", type=int, default=0, help="shuffle and augmentation seed")
    p.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="--json FILE exists: move it to NAME.old-<time>.json first (nothing is "
                        "deleted); without it an existing file is refused")
    return p


# --------------------------------------------------------------------------- images

def readable_images(n: int):
    """(n, 32, 32, 3) uint8 images that say where each pixel came from, and labels."""
    import numpy as np

    ids = np.arange(n)
    img = np.empty((n, HW, HW, 3), np.uint8)
    img[..., 0] = (7 * np.arange(HW) + 3)[None, :, None]
    img[..., 1] = (7 * np.arange(HW) + 3)[None, None, :]
    img[:, : HW // 2, :, 2] = (ids & 255)[:, None, None]
    img[:, HW // 2:, :, 2] = (ids >> 8)[:, None, None]
    return img, (ids % 10).astype(np.int64)


def _first(mask, values):
    """values at the first True of each row of `mask` (B, K); -1 where none.

    The first position is the least index where the mask holds (`amin`), so the choice
    does not rest on how a device's `argmax` breaks ties."""
    import torch

    k = mask.shape[1]
    pos = torch.arange(k, device=mask.device).expand_as(mask)
    first = torch.where(mask, pos, k).amin(dim=1)
    got = values.gather(1, first.clamp(max=k - 1)[:, None])[:, 0]
    return torch.where(first < k, got, torch.full_like(got, -1))


def read_back(x, pad: int, mean, std) -> dict:
    """Decode a float32 batch (B, C, H, W) of readable images: index, crop offsets (in
    the padded image, after the flip, as EpochPlan has them), flip, the rounded uint8
    pixels, the cutout mask, and the largest distance of an un-normalised value from a
    whole number.

    Everything after the rounding is integer arithmetic, on purpose: it must decode the
    same on every device. A float decode such as `((red - 3) / 7).long()` is exact on
    the CPU but not on a GPU, where ATen divides a float tensor by a Python scalar as a
    multiplication by the float32 reciprocal: 7 * 22 / 7 comes out 22.000002, and the
    offset `W + pad - 1 - j - col` of a flipped image 2.999998, truncated to 2. That
    was the H200's "crop dx skewed" failure (issue 20); tests/test_pipelines.py runs
    this decoder under the GPU's division rule.
    """
    import torch

    b = x.shape[0]
    m = torch.tensor(mean, device=x.device) * 255
    s = torch.tensor(std, device=x.device) * 255
    u = x.permute(0, 2, 3, 1).float() * s + m                 # B, H, W, C in uint8 units
    r = u.round()
    q = r.long()                                              # whole numbers: exact
    cut = (x == 0).all(dim=1)                                 # B, H, W: cutout zeros
    red, green = q[..., 0], q[..., 1]
    row = (red - 3).div(7, rounding_mode="floor")           # integer division: exact
    col = (green - 3).div(7, rounding_mode="floor")
    ok = ~cut & (red % 7 == 3) & (green % 7 == 3)             # zero padding fails this
    ii = torch.arange(HW, device=x.device)
    # A pixel in the interior, with its right neighbour, fixes dy, dx and the flip.
    inner = ok[:, :, :-1] & ok[:, :, 1:]
    inner[:, :, : HW // 4] = False
    inner[:, :, 3 * HW // 4:] = False
    inner[:, : HW // 4] = False
    inner[:, 3 * HW // 4:] = False
    flat = inner.reshape(b, -1)
    i_of = ii[:, None].expand(HW, HW - 1).reshape(-1).expand(b, -1)
    j_of = ii[None, :-1].expand(HW, HW - 1).reshape(-1).expand(b, -1)
    i0, j0 = _first(flat, i_of), _first(flat, j_of)
    src_r = _first(flat, row[:, :, :-1].reshape(b, -1))
    src_c = _first(flat, col[:, :, :-1].reshape(b, -1))
    src_c1 = _first(flat, col[:, :, 1:].reshape(b, -1))
    flip = (src_c1 < src_c).long()
    dy = src_r - i0 + pad
    # Not flipped: col = j + dx - pad. Flipped (mirror, then crop): col = W + pad - 1 - j - dx.
    dx = torch.where(flip == 1, HW + pad - 1 - j0 - src_c, src_c - j0 + pad)
    blue = q[..., 2].reshape(b, -1)
    lo = _first((ok & (row < HW // 2)).reshape(b, -1), blue)
    hi = _first((ok & (row >= HW // 2)).reshape(b, -1), blue)
    index = lo + 256 * hi
    index = torch.where((i0 < 0) | (lo < 0) | (hi < 0), torch.full_like(index, -1), index)
    frac = (u - r).abs().amax(dim=-1).masked_fill(cut, 0).amax()
    return {"index": index, "dy": dy, "dx": dx, "flip": flip, "u8": r, "cut": cut,
            "frac": float(frac)}


def unjitter(x, plan, start: int):
    """x with the colour jitter of the plan's images start.. undone: x / c - b (x itself
    without a plan). Cutout zeros are not jittered and stay zero."""
    if plan is None:
        return x
    n = x.shape[0]
    out = x.double()
    if plan.contrast is not None:
        out = out / plan.contrast[start:start + n].double().view(-1, 1, 1, 1)
    if plan.bright is not None:
        out = out - plan.bright[start:start + n].double().view(-1, 1, 1, 1)
    return out.masked_fill((x == 0).all(dim=1, keepdim=True), 0).float()


def rebuild(padded, index, dy, dx, flip):
    """The (B, H, W, C) crops the decoded draws imply, from the padded source images."""
    import torch

    ar = torch.arange(HW, device=padded.device)
    wp = padded.shape[2]
    rows = dy[:, None] + ar                                          # B, H
    cols = dx[:, None] + ar                                          # B, W
    cols = torch.where(flip[:, None] == 1, wp - 1 - cols, cols)
    return padded[index[:, None, None], rows[:, :, None], cols[:, None, :]]


def _chi2_crit(k: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square with k degrees of freedom at p = 0.001
    (Wilson-Hilferty)."""
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def _check(ok: bool, detail: str) -> dict:
    return {"ok": bool(ok), "detail": detail}


# --------------------------------------------------------------------------- one case

def run_case(name: str, settings: dict, images, labels, *, device, dtype, batch: int,
             epochs: int, seed: int, threads: int) -> dict:
    import torch

    from fastres.pipelines import Augment, build_loader
    from fastres.pipelines.augment import pad_images

    aug = Augment(**settings)
    pad = aug.pad if aug.crop != "none" else 0

    def make(loader, dt):
        return build_loader(loader, images, labels, train=True, batch_size=batch,
                            device=device, dtype=dt, mean=MEAN, std=STD, augment=aug,
                            seed=seed, workers=threads)

    padded = pad_images(torch.as_tensor(images), pad, aug.pad_mode).to(device)
    checks: dict[str, dict] = {}
    stats = {k: {"dy": [], "dx": [], "flip": [], "index": [], "cut_area": []}
             for k in ("dali", "tensor")}
    sums = {k: torch.zeros(3, 3, dtype=torch.float64) for k in ("dali", "tensor")}
    worst = {"diff": 0.0, "labels": True, "frac": 0.0, "pixels": 0, "labels_mod": 0,
             "bad_decode": 0, "box": 0}
    t0 = time.perf_counter()
    dali, tensor = make("dali", torch.float32), make("tensor", torch.float32)
    feed_path = getattr(dali, "feed_path", None)
    n_epoch = dali.num_examples
    jitter = bool(aug.brightness or aug.contrast)
    for epoch in range(epochs):
        dali.set_epoch(epoch)
        tensor.set_epoch(epoch)
        if len(dali) != len(tensor):
            raise RuntimeError(f"DALI loader has {len(dali)} batches an epoch, the tensor "
                               f"loader {len(tensor)}")
        plan = tensor.plan(epoch).to(device) if jitter else None
        for k, ((xd, yd), (xt, yt)) in enumerate(zip(dali, tensor)):
            worst["diff"] = max(worst["diff"], float((xd.float() - xt.float()).abs().max()))
            worst["labels"] &= bool(torch.equal(yd.cpu(), yt.cpu()))
            for key, x, y in (("dali", xd, yd), ("tensor", xt, yt)):
                d = read_back(unjitter(x.float(), plan, k * batch), pad, MEAN, STD)
                st = stats[key]
                for f in ("dy", "dx", "flip", "index"):
                    st[f].append(d[f].cpu())
                st["cut_area"].append(d["cut"].sum(dim=(1, 2)).cpu())
                xf = x.permute(1, 0, 2, 3).reshape(3, -1).double()    # on the device
                sums[key] += torch.stack([torch.full_like(xf[:, 0], xf.shape[1]), xf.sum(1),
                                          (xf * xf).sum(1)]).cpu()
                if key != "dali":
                    continue
                good = d["index"] >= 0
                worst["bad_decode"] += int((~good).sum())
                worst["frac"] = max(worst["frac"], d["frac"])
                worst["labels_mod"] += int((y.cpu()[good.cpu()] !=
                                            d["index"][good].cpu() % 10).sum())
                if good.any():
                    exp = rebuild(padded, d["index"][good], d["dy"][good], d["dx"][good],
                                  d["flip"][good]).float()
                    keep = ~d["cut"][good]
                    worst["pixels"] += int(((exp != d["u8"][good]).any(-1) & keep).sum())
                if aug.cutout:
                    cut = d["cut"]
                    h = cut.any(dim=2).sum(dim=1)
                    w = cut.any(dim=1).sum(dim=1)
                    worst["box"] += int(((h > aug.cutout) | (w > aug.cutout)
                                         | (cut.sum(dim=(1, 2)) != h * w)).sum())
    seconds = time.perf_counter() - t0
    tol = TOL["float32"]
    checks["same batches fp32"] = _check(worst["diff"] <= tol and worst["labels"],
                                         f"max |dali - tensor| {worst['diff']:.2e} (tol "
                                         f"{tol:.0e}); labels equal: {worst['labels']}")
    # The training dtype: a few batches are enough (the cast is the only new step).
    name_dt = str(dtype).replace("torch.", "")
    if dtype != torch.float32:
        dl, tl = make("dali", dtype), make("tensor", dtype)
        diff, nb = 0.0, 0
        for (xd, _), (xt, _) in zip(dl, tl):
            diff = max(diff, float((xd.float() - xt.float()).abs().max()))
            if xd.dtype != dtype or xt.dtype != dtype:
                diff = math.inf                                  # the wrong dtype fails
                break
            nb += 1
            if nb == 4:
                break
        checks[f"same batches {name_dt}"] = _check(diff <= TOL[name_dt],
                                                   f"max |dali - tensor| {diff:.2e} over {nb} "
                                                   f"batches (tol {TOL[name_dt]:.0e})")
        del dl, tl
    st = {k: {f: torch.cat(v) for f, v in s.items()} for k, s in stats.items()}
    d = st["dali"]
    checks["labels"] = _check(worst["labels_mod"] == 0 and worst["bad_decode"] == 0,
                              f"{worst['labels_mod']} labels != index mod 10; "
                              f"{worst['bad_decode']} images unreadable")
    per_epoch = d["index"].view(epochs, -1)
    distinct = [int(torch.unique(e).numel()) for e in per_epoch]
    checks["epochs"] = _check(all(c == n_epoch for c in distinct),
                              f"distinct images per epoch {distinct}, expected {n_epoch}")
    checks["pixels"] = _check(worst["pixels"] == 0,
                              f"{worst['pixels']} pixels differ from the rebuilt crop")
    checks["normalisation"] = _check(worst["frac"] < 2e-3,
                                     f"un-normalised values within {worst['frac']:.1e} of "
                                     f"whole numbers")
    k = 2 * pad + 1
    crop_detail, crop_ok = [], True
    for f in ("dy", "dx"):
        counts = torch.bincount(d[f].clamp(0, k - 1), minlength=k).double()
        if pad == 0:
            ok = bool((d[f] == 0).all())
            crop_detail.append(f"{f} all 0: {ok}")
        else:
            expect = counts.sum() / k
            chi2 = float(((counts - expect) ** 2 / expect).sum())
            crit = _chi2_crit(k - 1)
            ok = chi2 <= crit and bool(((d[f] >= 0) & (d[f] < k)).all())
            crop_detail.append(f"{f} chi2 {chi2:.1f} (crit {crit:.1f}), counts "
                               f"{counts.long().tolist()}")
        crop_ok &= ok
        same = torch.equal(d[f], st["tensor"][f])
        crop_ok &= same
    checks["crop"] = _check(crop_ok, "; ".join(crop_detail) + f"; tensor's draws equal: "
                            f"{torch.equal(d['dy'], st['tensor']['dy'])}")
    fl = d["flip"].double()
    n = fl.numel()
    if aug.flip == "none":
        ok, detail = bool((fl == 0).all()), "no image flipped"
    else:
        frac = float(fl.mean())
        z = (frac - 0.5) / math.sqrt(0.25 / n)
        ok, detail = abs(z) < 4.5, f"{frac:.4f} flipped (z {z:+.2f}, n {n})"
        if aug.flip == "alternate" and epochs >= 2:
            f_by_id = torch.full((epochs, len(labels)), -1, dtype=torch.long)
            ids = d["index"].view(epochs, -1)
            f_by_id.scatter_(1, ids.clamp(min=0), d["flip"].view(epochs, -1))
            both = (f_by_id[:-1] >= 0) & (f_by_id[1:] >= 0)
            alt = bool((f_by_id[:-1] != f_by_id[1:])[both].all())
            ok &= alt
            detail += f"; flipped in every other epoch: {alt} ({int(both.sum())} pairs)"
    checks["flips"] = _check(ok and torch.equal(d["flip"], st["tensor"]["flip"]), detail)
    area_d, area_t = d["cut_area"].double(), st["tensor"]["cut_area"].double()
    if aug.cutout:
        checks["cutout"] = _check(
            worst["box"] == 0 and torch.equal(area_d, area_t) and float(area_d.mean()) > 0,
            f"mean zeroed area {float(area_d.mean()):.1f} px (tensor "
            f"{float(area_t.mean()):.1f}); {worst['box']} boxes wrong")
    else:
        checks["cutout"] = _check(float(area_d.sum()) == 0, "off: no pixel zeroed")
    moments = {}
    for key, s in sums.items():
        cnt, s1, s2 = s
        mean = s1 / cnt
        moments[key] = (mean, (s2 / cnt - mean ** 2).clamp(min=0).sqrt())
    dm = float((moments["dali"][0] - moments["tensor"][0]).abs().max())
    ds = float((moments["dali"][1] - moments["tensor"][1]).abs().max())
    checks["channels"] = _check(dm < 1e-4 and ds < 1e-4,
                                f"mean {[round(float(v), 4) for v in moments['dali'][0]]} std "
                                f"{[round(float(v), 4) for v in moments['dali'][1]]}; "
                                f"|dali - tensor| {max(dm, ds):.1e}")
    return {"settings": settings, "batch_size": batch, "epochs": epochs,
            "images_per_epoch": n_epoch, "seconds": round(seconds, 2), "checks": checks,
            "feed_path": feed_path, "ok": all(c["ok"] for c in checks.values())}


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.json:  # checked (and claimed) before any work: the output contract
        from fastres.tools._common import claim_output_file

        args.json = str(claim_output_file(args.json, overwrite=args.overwrite))


    from fastres.bench import environment
    from fastres.engine.amp import precision_dtype
    from fastres.errors import ConfigError, unknown_choice
    from fastres.pipelines.dali import dali_available
    from fastres.tools._common import device_arg

    device = device_arg(args.device)
    gpu = device.type == "cuda"
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            raise unknown_choice("case", c, CASES)
    if not cases:
        raise ConfigError("--cases: name at least one")
    n = args.images or (25000 if gpu else 1024)
    batch = args.batch_size or (1000 if gpu else 128)
    if not 1 <= n <= 65536:
        raise ConfigError(f"--images must lie in [1, 65536] (the index is two bytes), got {n}")
    if batch < 1 or n < batch:
        raise ConfigError(f"--batch-size must lie in [1, --images={n}], got {batch}")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {args.epochs}")
    dtype = precision_dtype(args.dtype, "cuda" if gpu else "cpu")
    if not dali_available():
        raise ConfigError("the parity check needs NVIDIA DALI: pip install 'fastres[dali]', "
                          "or on an offline machine the kit of `fastres pack-dali`")
    env = environment(device)
    print(f"loader parity on {env['device']}: DALI {env['dali']} "
          f"({'GPU' if gpu else 'CPU'} operators) vs tensor loader; {n} readable images, "
          f"batch {batch}, {args.epochs} epochs per case", flush=True)
    images, labels = readable_images(n)
    results = {"environment": env, "device": str(device), "images": n, "cases": {}}
    for c in cases:
        r = run_case(c, CASES[c], images, labels, device=device, dtype=dtype, batch=batch,
                     epochs=args.epochs, seed=args.seed, threads=args.dali_threads)
        results["cases"][c] = r
        print(f"\n{c}: {r['settings']}  ({r['seconds']:.1f} s)")
        for name, chk in r["checks"].items():
            print(f"  {'ok  ' if chk['ok'] else 'FAIL'} {name:<20} {chk['detail']}")
    results["ok"] = all(r["ok"] for r in results["cases"].values())
    paths = {r["feed_path"] for r in results["cases"].values() if r["feed_path"]}
    for p in sorted(paths):
        print(f"\nDALI feed: {p}")
    if not gpu:
        print("not checked here (needs a CUDA device): DALI's GPU operators and its GPU feed "
              "(the data set in GPU memory, batches gathered there and handed to a GPU "
              "external source without a host copy); run this check on a GPU")
    print(f"\nparity: {'every check passed' if results['ok'] else 'FAILED'}")
    if args.json:
        from fastres.tools._common import write_json

        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("loader-parity", main))
