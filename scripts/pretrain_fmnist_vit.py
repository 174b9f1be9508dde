"""Pretrain arcvit's shipped backbone, vit_pico_patch7_28, on Fashion-MNIST (60k training images).

Run from the repo root inside the venv: ``python scripts/pretrain_fmnist_vit.py``. Writes the weights
(safetensors) and a provenance JSON (settings, data hash, test accuracy, wall time) into src/arcvit/weights/.
Augmentation: random 2-pixel translation and horizontal flip. The head is kept (10 classes); users replace it.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import platform
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

from arcvit.data.idx import FASHION_MNIST_DIR, load_fashion_mnist
from arcvit.fileio import sha256_file, write_json, write_safetensors
from arcvit.backends.timm.zoo import FMNIST_MEAN, FMNIST_STD, PICO_ARCH, PICO_NAME, PICO_PROVENANCE, PICO_WEIGHTS


def to_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)
    return ((x - FMNIST_MEAN[0]) / FMNIST_STD[0]).expand(-1, 3, -1, -1)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=-FMNIST_MEAN[0] / FMNIST_STD[0])
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    x = padded[:, :, dy:dy + 28, dx:dx + 28]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
                  for i in range(0, len(x), batch))
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    x_train, y_train = to_input(train_images), torch.from_numpy(train_labels)
    x_test, y_test = to_input(test_images), torch.from_numpy(test_labels)

    model = timm.create_model(PICO_NAME, pretrained=False, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(x_train) // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running += loss.item()
        test_acc = accuracy(model, x_test, y_test)
        print(f"epoch {epoch + 1}/{args.epochs} loss {running / steps_per_epoch:.4f} "
              f"test acc {test_acc:.4f} elapsed {time.time() - start:.0f}s", flush=True)

    write_safetensors(PICO_WEIGHTS, model.state_dict(), metadata={"format": "pt"})
    data_hash = hashlib.sha256()
    for name in sorted(p.name for p in FASHION_MNIST_DIR.glob("*.gz")):
        data_hash.update(sha256_file(FASHION_MNIST_DIR / name).encode())
    write_json(PICO_PROVENANCE, {
        "model": f"{PICO_NAME} (timm VisionTransformer)",
        "architecture": PICO_ARCH,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretraining": "self-pretrained by arcvit, supervised, Fashion-MNIST train split (60,000 images)",
        "script": "scripts/pretrain_fmnist_vit.py",
        "settings": vars(args) | {"optimizer": "AdamW", "schedule": "linear warm-up then cosine",
                                  "label_smoothing": 0.1, "grad_clip": 1.0,
                                  "augmentation": "random 2-pixel translation, horizontal flip"},
        "data": {"source": "Debian package dataset-fashion-mnist", "path": str(FASHION_MNIST_DIR),
                 "sha256_of_file_hashes": data_hash.hexdigest()},
        "test_accuracy": round(test_acc, 4),
        "wall_time_s": round(time.time() - start, 1),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "weights_sha256": sha256_file(PICO_WEIGHTS),
    })
    print(f"wrote {PICO_WEIGHTS} (test accuracy {test_acc:.4f})")


if __name__ == "__main__":
    main()
