"""Training benchmark: loop overhead vs a hand-written loop, data pipeline throughput, accuracy on real data.

    .venv/bin/python benchmarks/bench_train.py --out DIR [--quick]   ->  DIR/train.json

Real data is read from ../shared/data (MNIST idx files, imagenette-mini ImageFolder); a part whose data
is absent is recorded as skipped with the reason.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from edgeres.data import DataBundle, get_data, make_loader  # noqa: E402
from edgeres.env import environment  # noqa: E402
from edgeres.models import create_model  # noqa: E402
from edgeres.recipe import load_recipe, recipe_from_dict  # noqa: E402
from edgeres.train import train  # noqa: E402


class Tensors(torch.utils.data.TensorDataset):
    """In-memory (x, y) with int labels, as the hand-written loop uses."""

    def __getitem__(self, i):
        return self.tensors[0][i], int(self.tensors[1][i])


def in_memory_digits(size: int) -> tuple[Tensors, DataBundle]:
    b = get_data(dataset="digits", input_size=size)
    x = torch.stack([b.calib[i][0] for i in range(len(b.calib))])
    y = torch.tensor(b.calib.labels)
    ds = Tensors(x, y)
    small_test = torch.utils.data.Subset(b.test, range(32))
    return ds, DataBundle(train=ds, test=small_test, calib=ds, info=b.info)


def minimal_loop(ds, *, arch: str, batch: int, seed: int) -> float:
    """The reference: the plainest correct PyTorch training loop over the same in-memory data."""
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)
    model.train()
    seen, t0 = 0, time.perf_counter()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - t0)


def loop_overhead(quick: bool) -> dict:
    arch, batch, size = "resnet20", 64, 32
    ds, bundle = in_memory_digits(size)
    recipe = recipe_from_dict({"model": {"arch": arch}, "data": {"dataset": "digits", "input_size": size,
                               "batch_size": batch, "workers": 0},
                               "train": {"epochs": 1, "optimizer": "sgd", "lr": 0.01, "schedule": "constant"}})
    ref, ours = [], []
    for rep in range(2 if quick else 4):   # interleaved so that machine load hits both alike
        ref.append(minimal_loop(ds, arch=arch, batch=batch, seed=rep))
        with tempfile.TemporaryDirectory() as d:
            res = train(recipe.with_overrides({"train.seed": rep}), d, quiet=True, data=bundle)
        ours.append(res.history[0]["images_per_s"])
    r, o = statistics.median(ref), statistics.median(ours)
    return {"arch": arch, "batch": batch, "input": size, "images": len(ds), "minimal_loop_img_s": r,
            "edgeres_img_s": o, "ratio": o / r, "target": 0.95, "runs_minimal": ref, "runs_edgeres": ours}


def data_pipeline(quick: bool) -> dict:
    root = SHARED / "imagenette-mini"
    if not (root / "train").is_dir():
        return {"skipped": f"no ImageFolder data at {root}"}
    torch.set_num_threads(2)
    model = create_model("resnet18", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 3, 128, 128), torch.randint(0, 10, (64,))
    steps = 3 if quick else 6
    for _ in range(1):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model_img_s = steps * 64 / (time.perf_counter() - t0)
    out = {"model": "resnet18 train step, batch 64, 128 px", "model_img_s": model_img_s, "target_ratio": 3.0}
    n = 640 if quick else 2000
    for cache in (False, True):
        t0 = time.perf_counter()
        b = get_data(dataset="imagefolder", data_dir=str(root), input_size=128, augment=("random_resized_crop", "flip"),
                     cache=cache, workers=2)
        setup_s = time.perf_counter() - t0
        sub = torch.utils.data.Subset(b.train, range(n))
        for epoch in range(2 if cache else 1):   # with the cache, the second epoch is the steady state
            loader = make_loader(sub, batch_size=64, shuffle=True, workers=2, epoch=epoch)
            t0 = time.perf_counter()
            seen = sum(len(yb) for _, yb in loader)
            img_s = seen / (time.perf_counter() - t0)
        key = "cache" if cache else "jpeg_decode"
        out[key] = {"img_s": img_s, "setup_s": setup_s, "images": n, "ratio_vs_model": img_s / model_img_s}
    return out


def mnist_accuracy(quick: bool, out_dir: Path) -> dict:
    if not (SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        return {"skipped": f"no MNIST at {SHARED / 'mnist'}"}
    recipe = load_recipe("mnist").with_overrides({"data.data_dir": str(SHARED / "mnist"), "data.download": False})
    data = None
    if quick:   # a shortened run: 1 epoch on 10,000 training images, the full 10,000 test images
        b = get_data(**{**recipe.to_dict()["data"], "batch_size": None}, seed=recipe.train.seed)
        data = DataBundle(torch.utils.data.Subset(b.train, range(10000)), b.test, b.calib, b.info)
        recipe = recipe.with_overrides({"train.epochs": 1})
    t0 = time.perf_counter()
    res = train(recipe, out_dir / "mnist", quiet=True, data=data, force=True)
    return {"recipe": "mnist", "epochs": len(res.history), "quick_subset": quick, "test_top1": res.best_top1,
            "history": res.history, "seconds": time.perf_counter() - t0, "target_top1": 99.0}


def imagenette_accuracy(quick: bool, out_dir: Path) -> dict:
    root = SHARED / "imagenette-mini"
    if not (root / "train").is_dir():
        return {"skipped": f"no ImageFolder data at {root}"}
    recipe = load_recipe("imagenette_resnet18").with_overrides({"data.data_dir": str(root)})
    if quick:
        recipe = recipe.with_overrides({"train.epochs": 1})
    t0 = time.perf_counter()
    res = train(recipe, out_dir / "imagenette", quiet=True, force=True)
    return {"recipe": "imagenette_resnet18", "input": 128, "epochs": len(res.history), "test_top1": res.best_top1,
            "history": res.history, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="overhead,pipeline,mnist,imagenette")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"overhead": loop_overhead, "pipeline": data_pipeline,
             "mnist": lambda q: mnist_accuracy(q, args.out), "imagenette": lambda q: imagenette_accuracy(q, args.out)}
    result = {"quick": args.quick}
    for name in args.only.split(","):
        t0 = time.perf_counter()
        result[name] = parts[name](args.quick)
        result[name]["bench_seconds"] = time.perf_counter() - t0
        print(name, json.dumps({k: v for k, v in result[name].items() if k not in ("history", "runs_minimal",
                                                                                    "runs_edgeres")}, default=str))
    result["environment"] = environment()
    (args.out / "train.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'train.json'}")


if __name__ == "__main__":
    main()
