import os
import stat

import pytest

from modgrad.files import atomic_write


def test_atomic_write_default_permissions(tmp_path):
    path = atomic_write(tmp_path / "sub" / "out.txt", lambda tmp: open(tmp, "w").write("done"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "done"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def fail(tmp):
        open(tmp, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
