"""Images/s per CPU core of the host input pipeline, beside torchvision.

Both sides run pinned to one core on the same JPEGs (500 x 375, made from the
bundled demo photos), decode + transform + batch, in the same invocation,
timed over one epoch after 4 warm-up batches:

  ours        : sbam_jax.data InputPipeline (tf.data, fused decode-and-crop),
                uint8 out: normalisation and random erasing run on the device;
                kind 'pretrain' is the default (data.device_resize): the crop is
                resized on the accelerator, not here; 'pretrain_host' resizes
                on the host (PIL), as torchvision does
  torchvision : ImageFolder + the reference transforms, DataLoader(num_workers=0)
                (pre-train: MAE's RandomResizedCrop(0.2, 1) bicubic + flip +
                normalise; fine-tune: timm create_transform with
                rand-m9-mstd0.5-inc1 and re_prob 0.25, as MAE's fine-tune)

torchvision cannot be imported beside this project's pinned CPU torch, so it
runs under another interpreter (`--torch-python`, a venv with torch 2.14.1,
torchvision 0.29.1, timm and pillow 10.4: with Pillow >= 11 timm's
PosterizeIncreasing fails at magnitude 10, where it asks for 0 bits):

  python benchmarks/bench_input.py --images /tmp/bench_imgs --torch-python /tmp/tvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_images(root: str, count: int, seed: int = 0):
  """`count` 500 x 375 JPEGs in {root}/train/<photo>/ from random crops of the demo photos."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sbam_jax.data import demo  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(root, "train")):
    return
  rng = np.random.default_rng(seed)
  names = demo.photo_names()
  for i in range(count):
    name = names[i % len(names)]
    img = Image.open(os.path.join(demo.PHOTO_DIR, name + ".jpg")).convert("RGB")
    w, h = img.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    out = img.crop((x, y, x + cw, y + ch)).resize((500, 375), Image.BICUBIC)
    os.makedirs(os.path.join(root, "train", name), exist_ok=True)
    out.save(os.path.join(root, "train", name, f"{i:05d}.JPEG"), quality=90)


WARMUP_BATCHES = 4


def _time_batches(batches):
  """Images/s over an iterator of batches, after WARMUP_BATCHES warm-up batches."""
  it = iter(batches)
  for _ in range(WARMUP_BATCHES):  # tracing, thread start-up, file cache
    next(it)
  t0, n = time.perf_counter(), 0
  for b in it:
    n += len(b[0] if isinstance(b, (list, tuple)) else b["image"])
  return n / (time.perf_counter() - t0)


def run_ours(root, kind, batch):
  from sbam_jax.data import pipeline, sources, transforms  # pylint: disable=g-import-not-at-top
  source = sources.folder_source(root, "train")
  name = {"pretrain": "pretrain_crop", "pretrain_host": "pretrain"}.get(kind, kind)
  p = pipeline.InputPipeline(source, transforms.make_transform(name, 224), global_batch=batch,
                             image_size=224, seed=0, num_epochs=1, threads=1)
  return _time_batches(p)


def run_torchvision(root, kind, batch):
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets, transforms as T  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  if kind in ("pretrain", "pretrain_host"):
    tfm = T.Compose([T.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=3),
                     T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
  else:
    from timm.data import create_transform  # pylint: disable=g-import-not-at-top
    tfm = create_transform(input_size=224, is_training=True, color_jitter=None,
                           auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                           re_prob=0.25, re_mode="pixel", re_count=1, mean=MEAN, std=STD)
  ds = datasets.ImageFolder(os.path.join(root, "train"), transform=tfm)
  loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0,
                                       drop_last=True)
  return _time_batches(loader)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--images", default="/tmp/sbam_bench_images")
  ap.add_argument("--count", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--kinds", default="pretrain,pretrain_host,finetune")
  ap.add_argument("--impl", default="both", choices=["both", "ours", "torchvision"])
  ap.add_argument("--torch-python", default=None, help="interpreter with torchvision + timm")
  ap.add_argument("--core", type=int, default=0, help="the one CPU core both sides run on")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)

  if args.impl != "both":  # a measuring child: one core, one implementation
    os.sched_setaffinity(0, {args.core})
    fn = run_ours if args.impl == "ours" else run_torchvision
    for kind in args.kinds.split(","):
      print(json.dumps({"impl": args.impl, "kind": kind,
                        "img_per_s_per_core": fn(args.images, kind, args.batch)}))
    return

  make_images(args.images, args.count)
  common = ["--images", args.images, "--batch", str(args.batch), "--kinds", args.kinds,
            "--core", str(args.core)]
  rows = {}
  for impl, python in (("ours", sys.executable), ("torchvision", args.torch_python)):
    if python is None:
      print(f"skipping {impl}: no --torch-python given", file=sys.stderr)
      continue
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([python, os.path.abspath(__file__), "--impl", impl] + common,
                          capture_output=True, text=True, env=env)
    if proc.returncode:
      raise SystemExit(f"{impl} run failed:\n{proc.stderr[-3000:]}")
    out = proc.stdout
    for line in out.splitlines():
      row = json.loads(line)
      rows[(impl, row["kind"])] = row["img_per_s_per_core"]
  for kind in args.kinds.split(","):
    ours, ref = rows.get(("ours", kind)), rows.get(("torchvision", kind))
    row = {"bench": "input", "kind": kind, "images": f"{args.count} JPEG 500x375",
           "ours_img_per_s_per_core": ours, "torchvision_img_per_s_per_core": ref,
           "ratio": (ours / ref) if ours and ref else None, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(row))
    if args.out:
      with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
