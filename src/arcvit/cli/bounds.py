"""The stated bounds of the numeric command-line options that are not training settings (those are declared once,
on TrainConfig's fields, and the flags here that mean the same quantity reuse them), as argparse ``type=``
parsers (arcvit.numbers): ASCII digits within these bounds, else argparse's one-line error naming the flag
(exit 2). The bounds are wide enough for any real run and narrow enough to catch a slip of the keyboard."""
from __future__ import annotations

from arcvit.core.headers import MAX_CLASSES
from arcvit.numbers import real_flag, whole_flag
from arcvit.training.config import setting_bounds

BATCH_SIZE = setting_bounds("batch_size").flag()
CHECK_BATCH_SIZE = whole_flag(2, 4096)  # export's larger check batch (batch 1 is checked too)
EPOCHS = setting_bounds("epochs").flag()
RANK = setting_bounds("rank").flag()  # as an adapter file's header; the model's width is checked with the model
SEED = setting_bounds("seed").flag()
DEVICES = setting_bounds("devices").flag()
TRIALS = whole_flag(1, 100_000)
NUM_CLASSES = whole_flag(1, MAX_CLASSES)  # as a file header's num_classes
RETRIES = whole_flag(0, 100)
CPUS = real_flag(0, 1024, above=True)
GPUS = real_flag(0, 1024)
MEGABYTES = real_flag(0, 1_048_576, above=True)
GIGABYTES = real_flag(0, 1_048_576, above=True)  # data prepare's total budget
