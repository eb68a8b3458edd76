"""kit/export_folder.py: an export's folder appears whole or not at all, an OUT_DIR in use is
never replaced, and `run_export` ends a failed export with one line and its exit code.
The exporters' own tests (test_export_hf.py, test_export_gguf.py, test_run_files.py) check the
same through their command lines."""

import errno
import os
import stat

import pytest

from kit.export_folder import (
    EXPORT_TEMP_PREFIX,
    WriteFailed,
    check_out_dir,
    current_umask,
    run_export,
    write_new_folder,
)
from kit.files import DataError
from kit.locks import hold_folder


def write_two_files(folder):
    """A stand-in export: two small files; returns what the exporter would return."""
    for name in ("a.txt", "b.txt"):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(name)
    return "written"


def test_the_folder_appears_complete_with_the_usual_permissions(tmp_path):
    out_dir = tmp_path / "new" / "export"
    assert write_new_folder(str(out_dir), write_two_files) == "written"
    assert sorted(os.listdir(out_dir)) == ["a.txt", "b.txt"]
    assert (out_dir / "b.txt").read_text() == "b.txt"
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o777 & ~current_umask()
    assert sorted(os.listdir(tmp_path / "new")) == ["export"]  # no temporary folder left


def test_an_empty_out_dir_is_filled(tmp_path):
    (tmp_path / "export").mkdir()
    write_new_folder(str(tmp_path / "export"), write_two_files)
    assert sorted(os.listdir(tmp_path / "export")) == ["a.txt", "b.txt"]


def test_an_out_dir_with_files_or_a_file_is_refused(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="^" + str(tmp_path / "used") +
                       ": the folder exists and is not empty; pass a new folder as OUT_DIR "
                       "or delete this one$"):
        check_out_dir(str(tmp_path / "used"))
    with pytest.raises(DataError, match=": is a file, not a folder; pass a new folder as "
                                        "OUT_DIR$"):
        check_out_dir(str(tmp_path / "used" / "notes.txt"))
    check_out_dir(str(tmp_path / "missing"))  # a new path is fine
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("code, fix", [
    (errno.ENOSPC, "Free some space or pass another OUT_DIR"),
    (errno.EACCES, "Pass another OUT_DIR"),
])
def test_a_failed_write_leaves_nothing_and_names_its_cause(tmp_path, code, fix):
    def half_written(folder):
        write_two_files(folder)
        raise OSError(code, os.strerror(code))

    out_dir = tmp_path / "export"
    with pytest.raises(WriteFailed) as caught:
        write_new_folder(str(out_dir), half_written)
    assert str(caught.value) == (f"{out_dir}: could not write the export ({os.strerror(code)}); "
                                 f"nothing was written. {fix}, and run again")
    assert os.listdir(tmp_path) == []


def test_an_interrupt_while_writing_leaves_nothing(tmp_path):
    def interrupted(folder):
        write_two_files(folder)
        raise KeyboardInterrupt

    (tmp_path / "export").mkdir()
    with pytest.raises(KeyboardInterrupt):
        write_new_folder(str(tmp_path / "export"), interrupted)
    assert os.listdir(tmp_path) == ["export"]
    assert os.listdir(tmp_path / "export") == []


def test_a_killed_exports_folder_is_removed_and_a_running_ones_kept(tmp_path, capsys):
    left = tmp_path / (EXPORT_TEMP_PREFIX + "killed")
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"x" * 300_000)
    running = tmp_path / (EXPORT_TEMP_PREFIX + "running")
    running.mkdir()
    held = hold_folder(str(running))
    try:
        write_new_folder(str(tmp_path / "export"), write_two_files)
    finally:
        os.close(held)
    assert capsys.readouterr().out.splitlines() == [
        f"Removed 1 folder (0.3 MB) that an interrupted export left in {tmp_path}"]
    assert sorted(os.listdir(tmp_path)) == [EXPORT_TEMP_PREFIX + "running", "export"]


@pytest.mark.parametrize("error, code, line", [
    (DataError("model.pth: not found; pass a .pth"), 2, "Error: model.pth: not found; pass a .pth"),
    (WriteFailed("out: could not write"), 1, "Error: out: could not write"),
])
def test_run_export_ends_a_failed_export_in_one_line(capsys, error, code, line):
    def failing():
        raise error

    with pytest.raises(SystemExit) as caught:
        run_export(failing, "out")
    assert caught.value.code == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_run_export_returns_what_the_export_returns():
    assert run_export(lambda: ("alpaca", True), "out") == ("alpaca", True)
