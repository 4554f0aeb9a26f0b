"""utils/folder_lock.py: one run per result folder; a second run into a locked folder is refused
in one line, and two runs at once never mix their results."""
from __future__ import annotations

import os

import pytest
from fault_runs import noisy_pairs, run_limited, start_script

from conftest import assert_user_error


@pytest.mark.slow
def test_second_run_into_a_locked_result_folder_is_refused(tmp_path, weights):
    """While another run holds RESULT_DIR's lock, test.py into it exits 2 with one line naming the
    lock file and its holder, and writes nothing; once the lock is gone the run completes."""
    from utils.folder_lock import LOCK_NAME, FolderLock

    pairs = noisy_pairs(tmp_path / "pairs", ["1", "2"])
    result = tmp_path / "result"
    result.mkdir()
    holder = FolderLock(result, "--result_dir")
    argv = ("--weights", weights, "--input_dir", pairs, "--result_dir", result, "--save_images", "--device", "cpu")
    proc = run_limited("test.py", *argv)
    line = assert_user_error(proc, result / LOCK_NAME)
    assert f"held by process {os.getpid()}" in line and "--result_dir" in line
    assert [p.name for p in result.iterdir()] == [LOCK_NAME]
    holder.release()
    proc = run_limited("test.py", *argv)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_two_runs_at_once_never_mix_their_results(tmp_path, weights):
    """Two test.py runs of different inputs started together into one folder: each ends with exit 0
    or with the lock line (exit 2); metrics.csv and ori/ hold exactly one run's images."""
    first = noisy_pairs(tmp_path / "first", ["a1", "a2", "a3"], seed=1)
    second = noisy_pairs(tmp_path / "second", ["b1", "b2", "b3"], seed=2)
    result = tmp_path / "result"
    procs = [start_script("test.py", "--weights", weights, "--input_dir", src, "--result_dir", result,
                          "--save_images", "--device", "cpu") for src in (first, second)]
    outcomes = [(p.communicate(timeout=180)[1], p.returncode) for p in procs]
    for err, code in outcomes:
        assert code == 0 or (code == 2 and "is in use by another run" in err), err
    rows = sorted(line.split(",")[0] for line in (result / "metrics.csv").read_text().splitlines()[1:])
    assert rows in (["a1", "a2", "a3"], ["b1", "b2", "b3"])
    if any(code == 2 for _, code in outcomes):  # the refused run wrote nothing
        assert sorted(p.stem for p in (result / "ori").iterdir()) == rows


def test_abandon_removes_the_lock_and_only_the_empty_folders_this_run_made(tmp_path):
    """abandon(): the lock file goes; the folders made for the run (first_missing) go where they
    are empty, a folder that existed before stays, and a folder holding a file keeps it."""
    from utils.folder_lock import LOCK_NAME, FolderLock, first_missing

    result = tmp_path / "log_eval" / "eval15" / "run"
    created = first_missing(result)
    assert created == tmp_path / "log_eval"
    (result / "ori").mkdir(parents=True)
    FolderLock(result, "--result_dir", created).abandon()
    assert list(tmp_path.iterdir()) == []

    (result / "ori").mkdir(parents=True)
    (result / "ori" / "1.png").write_bytes(b"kept")
    FolderLock(result, "--result_dir", first_missing(result)).abandon()
    assert [p.relative_to(result).as_posix() for p in sorted(result.rglob("*"))] == ["ori", "ori/1.png"]

    before = tmp_path / "existing"
    before.mkdir()
    FolderLock(before, "--result_dir", first_missing(before)).abandon()
    assert before.is_dir() and not (before / LOCK_NAME).exists()


def test_a_lock_file_removed_before_it_was_locked_is_not_trusted(tmp_path, monkeypatch):
    """An abandoning run may remove the lock file between our open and our flock: the lock is then
    taken again on the file that the path names, never on the removed one."""
    import fcntl

    from utils import folder_lock
    from utils.folder_lock import LOCK_NAME, FolderLock

    real, calls = fcntl.flock, []

    def flock(fd, operation):
        if not calls:
            (tmp_path / LOCK_NAME).unlink()
        calls.append(fd)
        return real(fd, operation)

    monkeypatch.setattr(folder_lock.fcntl, "flock", flock)
    lock = FolderLock(tmp_path, "--result_dir")
    assert len(calls) == 2 and (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
    lock.release()
