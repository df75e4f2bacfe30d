"""Output directories that are complete or absent, and the files copied beside the weights.

Every verb that writes a directory (prepare, train, merge, export, convert) writes it through `atomic_directory`:

    out/.name.tmp-<pid>-xxxx/   built here, hidden, owned by this process
        -> os.replace(tmp, out)  only when the block succeeds

so an interrupted or failed run never leaves a directory that looks complete. A temporary directory whose process
is gone (SIGKILL, power loss) is removed by the next run that writes next to it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from qosora.errors import QosoraError

# Files copied from a source model directory next to the weights we write.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Delete `.{out.name}.tmp-<pid>-*` siblings whose process no longer runs (left by SIGKILL / SIGTERM)."""
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name[len(f".{out.name}.tmp-"):].split("-", 1)[0]
        if tmp.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_directory_path(out: str | Path) -> Path:
    """Refuse an --out that is a symbolic link or an existing file (it may be absent or a directory)."""
    out = Path(out)
    if out.is_symlink():
        raise QosoraError(f"--out {out} is a symbolic link: pass a plain directory path")
    if out.exists() and not out.is_dir():
        raise QosoraError(f"--out {out} is a file, not a directory: choose another --out")
    return out


def check_output_path(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse an output that would destroy an input, is a file or a link, or is a non-empty directory.

    Called before any work starts, so a bad --out fails in a second, not after the whole run.
    """
    out = check_directory_path(out)
    resolved = out.resolve()
    for src in inputs:
        if src is not None and _overlaps(resolved, Path(src).resolve()):
            raise QosoraError(f"--out {out} is (or contains, or lies inside) the input {src}: "
                              "writing there would destroy the input; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QosoraError(f"output {out} already exists and is not empty: choose another --out or pass --overwrite")
    return out


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory next to `out_dir` and rename it into place only if the block succeeds.

    `inputs` are directories the block reads: an `out_dir` equal to, inside or around one is refused before
    anything is written. The directory gets the umask's permissions (mkdtemp alone would make it 0700).
    """
    out = check_output_path(out_dir, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_side_files(src: Path, dst: Path, names: tuple[str, ...] = SIDE_FILES) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link large unchanged files (the NF4 residual of a 7B model is ~4 GB); copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
