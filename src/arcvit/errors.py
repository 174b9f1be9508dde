"""The errors arcvit raises for bad input: each names the file, field or value at fault.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class ArcvitError(Exception):
    """Base class for user-facing errors."""


class DataError(ArcvitError):
    """A data set, folder, list file or image is missing or malformed."""


class ModelError(ArcvitError):
    """A backbone is unsupported, or a checkpoint cannot be loaded safely."""


class AdapterFileError(ArcvitError):
    """An adapter file is missing, corrupt, or does not fit the backbone it is loaded onto."""


class ConfigError(ArcvitError):
    """A setting has an invalid value."""


class MissingExtra(ArcvitError):
    """A command, method or option needs an optional dependency (an extra such as ``arcvit[peft]``) that is not
    installed."""


class TrainingDiverged(ArcvitError):
    """The loss or the gradients stopped being finite numbers: the settings (usually the learning rate) do not
    train this model."""


class NonFiniteOutput(ArcvitError):
    """A model's logits are not finite numbers (its weights hold NaN/inf or overflow): no accuracy, label or
    merge check is reported from them, since an argmax over NaN would read as a chance-level answer."""


class DataWarning(UserWarning):
    """Data that is probably, not certainly, a mistake (a single-class split, a class never trained on,
    images dropped as unreadable): the run goes on, and the CLI prints it as one line on stderr."""


class MissingExtraWarning(DataWarning):
    """A by-product (a plot) skipped because its extra is not installed: the command's results stand, and the CLI
    prints this as one line like a data warning."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an exception's message (cut at ``limit`` characters), or "" when it has none:
    what a one-line error quotes of a library's own, often multi-line, message."""
    line = next((s.strip() for s in str(error).splitlines() if s.strip()), "")
    return line if limit is None else line[:limit]
