"""The cheap structural checks of a KB folder, shared by `validate` and every writer.

`validate` reads everything; a writer cannot afford that on every commit, but it must never
touch a KB that `validate` would refuse for a reason it can see cheaply. Both call
`structure_problems` (after the log itself was checked line by line): every file the log
lists is a regular file of at least the size the log implies, and no name a writer creates
or deletes is taken by a link, folder or device.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .disk_format import IVF_RE, LOCK, LOG, MANIFEST, RKEYS_RE, SHARD_RE, State, key_list, rkeys_file

TEMP_RE = re.compile(r"^\..*\.tmp$")  # atomic.write_atomic's temporary names


def _kind(mode: int) -> str:
    return "symbolic link" if stat.S_ISLNK(mode) else "folder" if stat.S_ISDIR(mode) else "special file"


def structure_problems(kb_dir: Path, st: State) -> list[str]:
    """One message per structural problem of the KB at `kb_dir` whose log gave `st`."""
    kb_dir, name = Path(kb_dir), Path(kb_dir).name
    problems = []
    try:
        entries = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(kb_dir)}
    except OSError as e:
        return [f"the folder of KB {name} cannot be listed ({e.strerror})"]
    for fname, s in sorted(entries.items()):
        writable = fname in (MANIFEST, LOG, LOCK) or SHARD_RE.match(fname) or RKEYS_RE.match(fname) or IVF_RE.match(fname) \
            or TEMP_RE.match(fname)
        if writable and not stat.S_ISREG(s.st_mode):
            problems.append(f"{fname} in KB {name} is a {_kind(s.st_mode)}, where the KB keeps a regular file; "
                            "remove it (a KB holds only its own regular files)")
    missing = [f"shard_{i:06d}.safetensors" for i in range(st.nshards) if f"shard_{i:06d}.safetensors" not in entries]
    if missing:
        problems.append(f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} listed by KB {name} but missing; "
                        "the KB is incomplete, re-copy it (or rebuild it)")
    if st.count:
        need = st.count * st.header.key_dims * 4
        for space, step in key_list(st.fingerprint):
            f = rkeys_file(space, step)
            if f not in entries:
                problems.append(f"{f} is listed by KB {name} but missing; the KB is incomplete, re-copy it (or rebuild it)")
            elif stat.S_ISREG(entries[f].st_mode) and entries[f].st_size < need:
                problems.append(f"{f} is {entries[f].st_size} bytes, shorter than the {st.count} committed keys "
                                f"({need} bytes); the KB is damaged, re-copy it (or rebuild it)")
    for rec in st.indexes.values():
        if rec.file not in entries:
            problems.append(f"{rec.file} is listed by KB {name} but missing; the KB is incomplete, re-copy it (or rebuild it)")
    return problems
