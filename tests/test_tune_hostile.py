"""arcvit tune against careless or concurrent use: the test split's list is never opened, a resumed study goes on
only with what it was started with, a second process on a live study is refused (or joins through a shared
storage) without losing a trial, settings that cannot work are refused before the study exists, and an error
inside Optuna reaches the user as one line."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
from conftest import BACKBONE, TINY_TASK, arcvit_command, subprocess_env
from test_tune import space_file, tune_args

from arcvit.training.config import DataSpec

_OPENED: list[str] | None = None  # while a list, every file path this process opens is appended to it


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # an audit hook cannot be removed: it records only inside `opened_files()`


@contextmanager
def opened_files():
    """Every path opened (by Python's open, Path.read_text, io, ...) while the block runs."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def one_line_error(capsys, code: int, message: str) -> str:
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("arcvit tune: error: ") and message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def fake_train(backbone, data, cfg, out, *, on_epoch_end, evaluate_test, **kw):
    """A trial in milliseconds: one epoch whose score is the learning rate (so trials differ)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    on_epoch_end(1, {"epoch": 1, "val_top1": cfg.lr})
    return {"val_top1": cfg.lr, "selected_epoch": 1, "trainable_params": 1}


# ---- the test split -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outside_data(tiny_data, tmp_path_factory) -> Path:
    """tiny_data's lists under a new root whose images folder is a symlink out of it, plus a test-only class:
    test.txt names a class (one more than classes.txt holds) that train800 and val200 never show."""
    root = tmp_path_factory.mktemp("outside") / "data"
    task = root / TINY_TASK
    task.mkdir(parents=True)
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "classes.txt"):
        shutil.copyfile(tiny_data / TINY_TASK / name, task / name)
    (task / "images").symlink_to(tiny_data / TINY_TASK / "images")
    classes = len((task / "classes.txt").read_text().splitlines())
    test = (tiny_data / TINY_TASK / "test.txt").read_text().splitlines()
    (task / "test.txt").write_text("\n".join([*test, f"{test[0].rsplit(maxsplit=1)[0]}x {classes}"]) + "\n")
    return root


def test_outside_root_refused_before_the_study_unless_allowed(outside_data, tmp_path, capsys):
    from arcvit.cli import main
    study = tmp_path / "study"
    one_line_error(capsys, main(tune_args(outside_data, study, "--trials", "1")), "outside the data root")
    assert not study.exists()


def test_search_never_opens_the_test_list_and_counts_classes_without_it(outside_data, tmp_path, capsys):
    """A real search (one trial, two steps): the test list is never opened, although it holds a class that
    makes `train` refuse the data (classes.txt names one class fewer); --allow-outside-root reaches the trial."""
    from arcvit.cli import main
    from arcvit.training.tune import make_job, tune
    test_list = str(outside_data / TINY_TASK / "test.txt")
    job = make_job(BACKBONE, DataSpec(str(outside_data), TINY_TASK, allow_outside_root=True), "arc", 1,
                   tmp_path / "study", fixed={"epochs": 1, "warmup_epochs": 0, "batch_size": 32,
                                              "accelerator": "cpu"})
    with opened_files() as opened:
        summary = tune(job, progress=False, max_steps_per_epoch=2)
    assert summary["finished"] == 1
    assert any(p.endswith("train800.txt") for p in opened)  # the hook does see the lists being read
    assert test_list not in opened and not any(p.endswith("test.txt") for p in opened)
    settings = json.loads((tmp_path / "study" / "trials" / "0000" / "settings.json").read_text())
    assert settings["num_classes"] == len((outside_data / TINY_TASK / "classes.txt").read_text().splitlines())
    # train, which evaluates test, reports the test-only class
    code = main(["train", "--backbone", BACKBONE, "--random-init", "--data", str(outside_data), "--task", TINY_TASK,
                 "--allow-outside-root", "--epochs", "1", "--warmup-epochs", "0", "--accelerator", "cpu", "--quiet",
                 "--out", str(tmp_path / "run")])
    assert code == 1 and "classes.txt: 6 names for 7 classes" in capsys.readouterr().err


# ---- resuming: only with what the study was started with -------------------------------------------------------


@pytest.fixture(scope="module")
def finished_study(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """(data root, study folder): a two-trial study of arc on a copy of tiny_data (trials faked)."""
    from arcvit.cli import main
    base = tmp_path_factory.mktemp("resume")
    data = base / "data"
    shutil.copytree(tiny_data, data)
    (data / "other_task").symlink_to(data / TINY_TASK)  # a second task under the same root
    with mock.patch("arcvit.training.tune.train", fake_train):
        assert main(tune_args(data, base / "study", "--trials", "2")) == 0
    return data, base / "study"


def _snapshot(study: Path) -> dict[str, bytes]:
    return {str(p.relative_to(study)): p.read_bytes() for p in sorted(study.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, message", [
    ("method", "holds study 'shapes_tiny.arc', not 'shapes_tiny.lora': --resume goes on with what it was started "
               "with (method 'arc' -> 'lora'"),
    ("task", "holds study 'shapes_tiny.arc', not 'other_task.arc'"),
    ("root", "was started with other settings (data.root "),
    ("fingerprint", "was started with other settings (data.fingerprints.val "),
    ("space", "space.ranges.lr.high "),
    ("setting", "settings.weight_decay "),
    ("name", "holds study 'shapes_tiny.arc', not 'mine'"),
])
def test_resume_refuses_another_data_method_task_or_space(case, message, finished_study, tmp_path, capsys):
    from arcvit.cli import main
    data, study = finished_study
    argv = tune_args(data, study, "--trials", "3", "--resume")
    val = data / TINY_TASK / "val200.txt"
    original = val.read_text()
    if case == "method":
        argv[argv.index("arc")] = "lora"
    elif case == "task":
        argv[argv.index(TINY_TASK)] = "other_task"
    elif case == "root":
        shutil.copytree(data, tmp_path / "copy", symlinks=True)
        argv[argv.index(str(data))] = str(tmp_path / "copy")
    elif case == "fingerprint":
        val.write_text("".join(original.splitlines(keepends=True)[:-1]))  # one validation image fewer
    elif case == "space":
        argv += ["--config", str(space_file(tmp_path, "[defaults]\nlr = {low = 1e-3, high = 5e-3, log = true}\n"))]
    elif case == "setting":
        argv += ["--weight-decay", "0.5"]
    elif case == "name":
        argv += ["--study-name", "mine"]
    before = _snapshot(study)
    try:
        with mock.patch("arcvit.training.tune.train", side_effect=AssertionError("no trial may run")):
            one_line_error(capsys, main(argv), message)
    finally:
        val.write_text(original)
    assert _snapshot(study) == before


def test_resume_with_the_same_settings_goes_on(finished_study, capsys):
    from arcvit.cli import main
    data, study = finished_study
    with mock.patch("arcvit.training.tune.train", fake_train):
        assert main(tune_args(data, study, "--trials", "2", "--resume")) == 0
    assert "2 trial(s) finished already" in capsys.readouterr().err


# ---- settings that cannot work, refused before the study exists --------------------------------------------------


def _without(argv: list[str], *flags: str) -> list[str]:
    """``argv`` less each of ``flags`` and its value (so that a search-space range is not fixed by a flag)."""
    for flag in flags:
        at = argv.index(flag)
        del argv[at:at + 2]
    return argv


@pytest.mark.parametrize("extra, space, message", [
    (("--rank", "65536"), None, "rank 65536 exceeds the model's width 128"),
    (("--method", "lora", "--rank", "60000"), None, "rank 60000 exceeds the width of lora's target layers"),
    (("--method", "adaptformer", "--rank", "60000"), None, "rank 60000 exceeds the model's width 128"),
    (("--method", "vera", "--rank", "60000"), None, "rank 60000 exceeds the largest dimension of vera's"),
    ((), "[methods.arc]\nrank = {low = 4, high = 4096}\n", "rank 4096 exceeds the model's width 128"),
    (("--storage", "sqlite://"), None, "an in-memory SQLite database ends with the process"),
    (("--storage", "sqlite:///:memory:"), None, "an in-memory SQLite database ends with the process"),
    (("--accelerator", "cuda"), None, "--accelerator cuda: no CUDA GPU is visible"),
    (("--checkpoint", "/nonexistent/nope.pth"), None, "/nonexistent/nope.pth: no such checkpoint file"),
    (("--batch-size", "1000"), None, "batch_size 1000 (the largest a trial can get) is larger than the training "
                                     "split (160 images)"),
    (("-", "--batch-size"), "[defaults]\nbatch_size = {choices = [8, 400]}\n",
     "batch_size 400 (the largest a trial can get)"),
    (("-", "--epochs", "--warmup-epochs"), "[defaults]\nepochs = {low = 2, high = 5}\n"
                                           "warmup_epochs = {low = 0, high = 3}\n",
     "search space: a trial can draw lr = 0.0001, weight_decay = 1e-05"),
])
def test_settings_that_cannot_work_refused_before_the_study(extra, space, message, tiny_data, tmp_path, capsys):
    import torch

    from arcvit.cli import main
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    out = tmp_path / "study"
    argv = tune_args(tiny_data, out, "--trials", "2")
    if space:
        argv += ["--config", str(space_file(tmp_path, space))]
    argv = _without(argv, *extra[1:]) if extra[:1] == ("-",) else argv + list(extra)  # "-": flags to leave out
    with mock.patch("arcvit.training.tune.train", side_effect=AssertionError("no trial may run")):
        one_line_error(capsys, main(argv), message)
    assert not out.exists()


# ---- errors raised inside Optuna -----------------------------------------------------------------------------


def test_storage_of_an_old_optuna_schema_is_one_line(tiny_data, tmp_path, capsys):
    """Optuna raises a RuntimeError for a storage written by an incompatible version."""
    import sqlite3

    from arcvit.cli import main
    out = tmp_path / "study"
    out.mkdir()
    with sqlite3.connect(out / "study.db") as db:
        db.execute("create table version_info (version_info_id integer primary key, schema_version integer, "
                   "library_version text)")
        db.execute("insert into version_info values (1, 1, '0.1')")
    one_line_error(capsys, main(tune_args(tiny_data, out, "--trials", "1", "--resume")),
                   "RuntimeError: The runtime optuna version")


def test_trial_failed_by_another_process_is_one_line(tiny_data, tmp_path, capsys):
    """A storage another process changed under a running trial (here: it marks the trial failed, as a stale
    heartbeat check would) ends the search with one line, not Optuna's traceback."""
    import optuna

    from arcvit.cli import main
    out = tmp_path / "study"

    def failed_meanwhile(backbone, data, cfg, folder, **kw):
        storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
        study = optuna.load_study(study_name=f"{TINY_TASK}.arc", storage=storage)
        trial = study.get_trials(deepcopy=False)[-1]
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return fake_train(backbone, data, cfg, folder, **kw)
    with mock.patch("arcvit.training.tune.train", failed_meanwhile):
        one_line_error(capsys, main(tune_args(tiny_data, out, "--trials", "1")), "ValueError: Cannot tell a FAIL")


# ---- two processes on one study ------------------------------------------------------------------------------


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*arcvit_command(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


# The first process: the real `arcvit tune` whose one trial, once started, waits to be killed.
HOLDER = """
import sys, time
from pathlib import Path
from unittest import mock
from arcvit.cli import main

def trial(backbone, data, cfg, out, **kw):
    Path(out).mkdir(parents=True)
    time.sleep(600)

with mock.patch("arcvit.training.tune.train", trial):
    sys.exit(main(sys.argv[1:]))
"""


def test_second_process_is_refused_while_the_first_holds_the_study(tiny_data, tmp_path, capsys):
    """Two real processes: a second `tune --resume` (or a fresh `tune`) on a live study stops at once with one
    line, fails no trial and changes nothing; once the first is killed, the OS has released its lock."""
    import optuna

    from arcvit.cli import main
    from arcvit.training.runfolder import run_lock
    study = tmp_path / "study"
    args = tune_args(tiny_data, study, "--trials", "2")
    first = subprocess.Popen([sys.executable, "-c", HOLDER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=subprocess_env(), start_new_session=True)
    try:
        _wait_for(study / "trials" / "0000", first)
        before = _snapshot(study)
        for extra in (["--resume"], []):
            one_line_error(capsys, main(args + extra), "another arcvit tune process is working in this study")
        assert first.poll() is None and _snapshot(study) == before
        trials = optuna.load_study(study_name=f"{TINY_TASK}.arc", storage=f"sqlite:///{study / 'study.db'}").trials
        assert [t.state.name for t in trials] == ["RUNNING"]  # the first's trial was not failed by the second
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    with run_lock(study):
        pass


@pytest.mark.slow
def test_second_process_joins_through_a_shared_storage(tiny_data, tmp_path):
    """Two real processes on one study: the second joins the live first through --storage (its own --out);
    both end with exit 0, every trial of both completes or is pruned, none is failed."""
    first_out, second_out = tmp_path / "first", tmp_path / "second"
    first = _start(*tune_args(tiny_data, first_out, "--trials", "4", "--epochs", "4"))
    _wait_for(first_out / "trials" / "0000", first)
    second = _start(*tune_args(tiny_data, second_out, "--trials", "4", "--epochs", "4",
                               "--storage", f"sqlite:///{first_out / 'study.db'}"))
    for proc in (first, second):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    import optuna
    trials = optuna.load_study(study_name=f"{TINY_TASK}.arc", storage=f"sqlite:///{first_out / 'study.db'}").trials
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}, trials
    assert {Path(t.user_attrs["run_dir"]).parent.parent for t in trials} == {first_out, second_out}  # both ran some


def test_every_method_passes_the_checks_before_a_study(tiny_data, tmp_path):
    """make_job builds each method on the meta device at the largest rank its packaged space can draw: a method
    that cannot be built there would make tune unusable for it."""
    from arcvit.methods import METHODS
    from arcvit.training.tune import make_job
    for method in METHODS:
        job = make_job(BACKBONE, DataSpec(str(tiny_data), TINY_TASK), method, 1, tmp_path / method,
                       fixed={"accelerator": "cpu"})
        assert job.data_identity["layout"] == "vtab" and set(job.data_identity["fingerprints"]) == {"train", "val"}
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("method, message", [
    ("arc", "rank 60000 exceeds the model's width 128"),
    ("lora", "rank 60000 exceeds the width of lora's target layers (qkv, fc1): 128; use --rank 128 or less"),
    ("vera", "rank 60000 exceeds the largest dimension of vera's target layers (qkv, fc1): 512"),
    ("adaptformer", "rank 60000 exceeds the model's width 128 (at blocks.0)"),
])
def test_train_refuses_a_rank_beyond_the_width(method, message, tiny_data, tmp_path, capsys):
    """The same limit in `train`, before any tensor of that size is allocated (it used to be the allocator's
    RuntimeError for every method but ARC)."""
    from arcvit.cli import main
    out = tmp_path / "run"
    code = main(["train", "--backbone", BACKBONE, "--random-init", "--data", str(tiny_data), "--task", TINY_TASK,
                 "--method", method, "--rank", "60000", "--epochs", "1", "--warmup-epochs", "0",
                 "--accelerator", "cpu", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("arcvit train: error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("layout", ["vtab", "fgvc"])
def test_load_split_without_test_never_reads_the_test_file(layout, tmp_path):
    """The layouts' side of the promise: with open_test=False the test list (VTAB-1k test.txt, FGVC test.json)
    is not read, though an unreadable one fails every split when it is; and the test split itself is refused."""
    import numpy as np

    from arcvit.data.layouts import load_split
    from arcvit.data.writers import write_fgvc_task, write_vtab_task
    from arcvit.errors import ConfigError, DataError
    images, labels = np.zeros((6, 8, 8), dtype=np.uint8), np.array([0, 1, 2, 0, 1, 2])
    splits = {"train": (images[:3], labels[:3]), "val": (images[3:5], labels[3:5]), "test": (images[5:], labels[5:])}
    if layout == "vtab":
        task = write_vtab_task(tmp_path / "custom", {"train800" if k == "train" else "val200" if k == "val" else k: v
                                                     for k, v in splits.items()})
        name, train, test_file = "custom", "train800", task / "test.txt"
    else:
        task = write_fgvc_task(tmp_path / "Stanford-dogs", splits, image_subdir="Images")
        name, train, test_file = "Stanford-dogs", "train", task / "test.json"
    test_file.write_bytes(b"\xff\xfe not a list")
    with pytest.raises(DataError, match="test"):
        load_split(tmp_path, name, train, None)
    assert len(load_split(tmp_path, name, train, None, open_test=False)) == 3
    with pytest.raises(ConfigError, match="test split may not be opened"):
        load_split(tmp_path, name, "test", None, open_test=False)


# ---- workers sharing one study, and what messages show of a storage URL ---------------------------------------


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks for trials by hand, not by optimize
def test_workers_that_start_together_draw_different_settings(tiny_data, tmp_path):
    """Two processes ask the shared study for a trial before either has finished one: each draw is seeded by its
    trial's number (unique across processes), so they differ, and the same number always draws the same."""
    from arcvit.training.tune import draw_settings, make_job, open_study
    job = make_job(BACKBONE, DataSpec(str(tiny_data), TINY_TASK), "arc", 4, tmp_path / "a", pretrained=False)
    first = open_study(job)
    second = open_study(job, resume=True)  # another process's handle on the same storage
    one, two = first.ask(), second.ask()
    assert {one.number, two.number} == {0, 1}
    drawn = [draw_settings(job, one), draw_settings(job, two)]
    assert drawn[0] != drawn[1]
    again = make_job(BACKBONE, DataSpec(str(tiny_data), TINY_TASK), "arc", 4, tmp_path / "b", pretrained=False)
    assert draw_settings(again, open_study(again).ask()) == drawn[one.number]


def test_messages_hide_a_storage_password_and_postgres_gets_a_connect_timeout():
    from arcvit.training.storage_url import engine_options, shown_url
    assert shown_url("postgresql://arc:s3cret@db.example:5432/studies") == "postgresql://arc:***@db.example:5432/studies"
    assert shown_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert shown_url("postgresql://db/s?sslmode=require&password=s3cret&PGPASSWORD=s3cret#x") == \
        "postgresql://db/s?sslmode=require&password=***&PGPASSWORD=***#x"
    assert shown_url("postgresql://arc:s3@c:ret@db/s") == "postgresql://arc:***@db/s"  # an unencoded @ or :
    assert shown_url("arc:s3cret@db") == "arc:***@db"  # no scheme: still hidden
    assert engine_options("postgresql://arc:s3cret@db/studies") == {"connect_args": {"connect_timeout": 10}}
    assert engine_options("postgresql://db/studies?connect_timeout=3") == {}
    assert engine_options("sqlite:////tmp/x.db") == {}


@pytest.mark.parametrize("url, message", [
    ("not a url", "argument --storage: 'not a url': not a database URL (e.g. sqlite:////path/study.db"),
    ("postgresql://arc:s3cret@db.example:port/studies?password=s3cret",
     "argument --storage: 'postgresql://arc:***@db.example:port/studies?password=***': not a database URL: its "
     "port is not a number"),
])
def test_a_storage_url_that_does_not_parse_is_argparses_one_line(url, message, tiny_data, tmp_path, capsys):
    from arcvit.cli import main
    with pytest.raises(SystemExit, match="^2$") as e:
        main(tune_args(tiny_data, tmp_path / "study", "--trials", "2", "--storage", url))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("arcvit tune: error: ") and message in err and "s3cret" not in err, err
    assert not (tmp_path / "study").exists()


def test_bench_tune_parses_its_storage_url_the_same_way(capsys):
    from arcvit.cli import main
    with pytest.raises(SystemExit, match="^2$") as e:
        main(["bench", "--storage", "postgresql://arc:s3cret@db:5432x/studies"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "s3cret" not in err
    assert err == ("arcvit bench: error: argument --storage: 'postgresql://arc:***@db:5432x/studies': not a database "
                   "URL: its port is not a number (e.g. sqlite:////path/study.db, postgresql://host/db) (see arcvit "
                   "bench --help)")


@pytest.mark.parametrize("url, shown", [
    ("postgresql://arc:s3cret@127.0.0.1:1/studies?password=s3cret",
     "storage 'postgresql://arc:***@127.0.0.1:1/studies?password=***' cannot be opened"),
    ("sqlite:////nonexistent-dir/x.db?sslpassword=s3cret", "storage 'sqlite:////nonexistent-dir/x.db?sslpassword=***' "
                                                           "cannot be opened"),
])
@pytest.mark.filterwarnings("ignore:Query string argument")  # SQLite ignores the parameter, and says so
def test_a_storage_that_cannot_be_opened_never_shows_its_password(url, shown, tiny_data, tmp_path, capsys):
    """No database is needed: the driver is missing or the server refuses, and the message names the URL."""
    from arcvit.cli import main
    err = one_line_error(capsys, main(tune_args(tiny_data, tmp_path / "study", "--trials", "2", "--storage", url)),
                         shown)
    assert "s3cret" not in err


def test_a_worker_that_loses_the_race_to_create_the_tables_opens_the_storage(tmp_path, monkeypatch):
    """Two workers starting on a new PostgreSQL database both create Optuna's tables; the loser's transaction
    fails on a unique constraint (seen with a real server) and it opens the storage again instead of failing."""
    import optuna
    from sqlalchemy.exc import IntegrityError

    from arcvit.training.tune import _open_storage
    real, calls = optuna.storages.RDBStorage, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise IntegrityError("CREATE TABLE studies", {}, Exception("duplicate key value violates unique "
                                                                       "constraint \"pg_type_typname_nsp_index\""))
        return real(*args, **kwargs)
    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = _open_storage(optuna, f"sqlite:///{tmp_path / 's.db'}", None)
    assert len(calls) == 2 and storage.get_all_studies() == []
