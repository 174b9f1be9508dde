"""The stated bounds of every numeric command-line option, as argparse ``type=`` parsers (arcvit.numbers): ASCII
digits within these bounds, else argparse's one-line error naming the flag (exit 2). The bounds are wide enough
for any real run and narrow enough to catch a slip of the keyboard; the library checks its own limits again."""
from __future__ import annotations

from typing import Callable

from arcvit.core.adapter_file import MAX_RANK
from arcvit.core.headers import MAX_CLASSES
from arcvit.numbers import real_flag, whole_flag

BATCH_SIZE = whole_flag(1, 65536)
CHECK_BATCH_SIZE = whole_flag(2, 4096)  # export's larger check batch (batch 1 is checked too)
EPOCHS = whole_flag(1, 100_000)
RANK = whole_flag(1, MAX_RANK)  # as an adapter file's header; the model's width is checked with the model
SEED = whole_flag(0, 2**32 - 1)
DEVICES = whole_flag(1, 1024)
TRIALS = whole_flag(1, 100_000)
NUM_CLASSES = whole_flag(1, MAX_CLASSES)  # as a file header's num_classes
RETRIES = whole_flag(0, 100)
CPUS = real_flag(0, 1024, above=True)
GPUS = real_flag(0, 1024)
MEGABYTES = real_flag(0, 1_048_576, above=True)
GIGABYTES = real_flag(0, 1_048_576, above=True)  # data prepare's total budget
FRACTION = real_flag(0, 1, below=True)  # dropout, drop path, label smoothing: [0, 1)

TRAIN_NUMBERS: dict[str, Callable[[str], float]] = {  # one per numeric TrainConfig field (tests check none is missing)
    "rank": RANK,
    "adapter_dropout": FRACTION,
    "lr": real_flag(0, 1e6, above=True),  # larger diverges at once (the loop says so)
    "weight_decay": real_flag(0, 100),
    "batch_size": BATCH_SIZE,
    "epochs": EPOCHS,
    "warmup_epochs": whole_flag(0, 100_000),
    "grad_clip": real_flag(0, 1e6),
    "label_smoothing": FRACTION,
    "seed": SEED,
    "devices": DEVICES,
    "num_nodes": whole_flag(1, 4096),
    "num_workers": whole_flag(0, 1024),
    "drop_path": FRACTION,
    "eval_batch_size": BATCH_SIZE,
}
