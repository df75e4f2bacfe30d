"""Output directories: killed runs leave nothing that blocks the next, permissions follow the umask, SIGTERM
unwinds like Ctrl-C, and an --out that is a file or a link is refused before any work."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from conftest import assert_one_line_error, run_cli
from qosora.errors import QosoraError
from qosora.files import atomic_directory


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / f".out.tmp-{_dead_pid()}-abc"
    alive = tmp_path / f".out.tmp-{os.getppid()}-def"  # our parent runs: not ours to remove
    for d in (dead, alive):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "big.safetensors").write_bytes(b"x" * 1000)
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("done")
    assert not dead.exists() and alive.exists()
    assert (tmp_path / "out" / "f").read_text() == "done"


def test_output_directory_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_out_that_is_a_file_or_a_link_is_refused_even_with_overwrite(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("precious")
    else:
        (tmp_path / "elsewhere").mkdir()
        out.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(QosoraError, match="file, not a directory" if kind == "file" else "symbolic link"):
        with atomic_directory(out, overwrite=True):
            raise AssertionError("the block must not run")
    assert out.is_symlink() or out.read_text() == "precious"


def test_sigterm_unwinds_and_removes_the_temporary(tmp_path, capsys, monkeypatch):
    import qosora.commands.merge as merge_cmd

    def run(args):
        with atomic_directory(args.out) as tmp:
            (tmp / "partial").write_bytes(b"x" * 100)
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(merge_cmd, "run", run)
    rc, out, err = run_cli(capsys, "merge", tmp_path / "src", "--out", tmp_path / "merged")
    assert rc == 130 and "interrupted" in err and out == ""
    assert [p.name for p in tmp_path.iterdir()] == []


def test_cli_refuses_a_file_out_in_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("precious")
    rc, out, err = run_cli(capsys, "merge", tmp_path / "missing", "--out", tmp_path / "out", "--overwrite")
    assert_one_line_error(rc, out, err, "merge")
    assert (tmp_path / "out").read_text() == "precious"
