"""The scratch folder a merge writes into, next to its output (renamed onto it when done, removed on failure).

A process killed outright (SIGKILL, the OOM killer) leaves its scratch folder behind, partial shards and all. So
a scratch folder's name carries its owner (this machine's boot and pid namespace, and the pid), and each merge
into an output first removes the scratch folders of that output whose owner is gone. A folder whose owner can't
be told (another machine or container on a shared disk, a name from an older version) is left alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path


def new_scratch(parent: Path, target_name: str) -> Path:
    """A fresh scratch folder name for output ``target_name`` under ``parent`` (not created)."""
    owner = _machine()
    tag = f"{owner}-{os.getpid()}-" if owner else ""
    return parent / f".{target_name}.alloy-tmp-{tag}{uuid.uuid4().hex[:12]}"


def remove_abandoned(parent: Path, target_name: str) -> list[Path]:
    """Remove the scratch folders of output ``target_name`` under ``parent`` left by dead processes of this
    machine; returns them."""
    machine = _machine()
    if machine is None or not parent.is_dir():
        return []
    removed = []
    for path in parent.glob(f".{target_name}.alloy-tmp-*"):
        owner, _, rest = path.name.removeprefix(f".{target_name}.alloy-tmp-").partition("-")
        pid, _, _ = rest.partition("-")
        if owner == machine and pid.isdigit() and path.is_dir() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _machine() -> str | None:
    """This kernel's boot and this pid namespace, hashed (a pid means something only inside both); None where
    they can't be read (then no owner is recorded, and nothing is removed)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return hashlib.sha256(f"{boot}/{namespace}".encode()).hexdigest()[:10]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, owned by another user
        return True
    return True
