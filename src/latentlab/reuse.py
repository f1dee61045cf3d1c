"""Finished stages taken from other run folders instead of being made again: `latentlab run --reuse PLACE`, and
the trials of a sweep, which share every stage they agree on (across seeds the judge, whose seed is its own;
across grid points every stage upstream of the setting that changes).

A donor's stage stands in for one here when the donor's stages.json records it with the same hash (the same
settings, seed and data, and the same hashes for every stage it reads) and every file it wrote is still there.
The files are hard-linked (copied across filesystems), its metrics.json sections (as the stage returned them,
kept in its record: later stages rewrite some of them, such as the evaluation the GANs' quality) are merged in,
and its record here says where it came from. A PLACE is a run folder, or a folder of run folders such as a
sweep's. In the latter, runs claim each stage they make with a lock in PLACE/.making/, so that a sibling needing
the same stage does its other work first, or waits, instead of making it twice; the kernel drops the lock of a run
that dies.
"""
import fcntl
import os
import shutil
import time
from pathlib import Path

from latentlab.errors import LatentlabError

NEVER = ("report",)  # a run's report is about that run


def check_places(places) -> None:
    """--reuse PLACE...: each must be a folder (checked before any work)."""
    for place in places:
        if not Path(place).is_dir():
            raise LatentlabError(f"--reuse {place}: not a folder")


def is_run_folder(path: Path) -> bool:
    return (path / "stages.json").is_file()


def donors(places: list[Path], own: Path) -> list[Path]:
    """The run folders among `places` (each a run folder, or a folder of them), this run's own left out."""
    own = own.resolve()
    found = []
    for place in places:
        if is_run_folder(place):
            found.append(place)
        elif place.is_dir():
            found += sorted(p for p in place.iterdir() if p.is_dir() and is_run_folder(p))
    return [d for d in dict.fromkeys(found) if d.resolve() != own]


def _inside(name) -> bool:
    """A path relative to the run folder that stays inside it."""
    return isinstance(name, str) and bool(name) and "\0" not in name and not Path(name).is_absolute() \
        and ".." not in Path(name).parts


def finished(donor: Path, name: str, stage_hash: str, outputs: tuple[str, ...]) -> dict | None:
    """The donor's record of stage `name` if it was made with `stage_hash` and every file it wrote is there."""
    from latentlab.runfolder import read_json  # (here: `latentlab sweep` checks its places before importing torch)

    try:
        record = read_json(donor / "stages.json").get(name)
    except (LatentlabError, AttributeError):  # unreadable, or not an object: not a donor
        return None
    if not isinstance(record, dict) or record.get("hash") != stage_hash:
        return None
    files, sections = record.get("files"), record.get("sections")
    if not isinstance(files, list) or not all(map(_inside, files)) or not isinstance(sections, dict) \
            or not all(isinstance(k, str) and isinstance(v, dict) for k, v in sections.items()):
        return None  # recorded before stages kept their files and sections, or not written by latentlab
    if not set(outputs) <= set(files) or not all((donor / f).is_file() for f in files):
        return None
    return record


def link_or_copy(source: Path, target: Path) -> None:
    """`target` becomes `source`'s content in one rename (a hard link where the filesystem allows one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.reuse")
    temporary.unlink(missing_ok=True)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copy2(source, temporary)
    os.replace(temporary, target)


def adopt(root: Path, donor: Path, name: str, record: dict) -> dict | None:
    """Link the donor stage's files into `root`; its metrics.json sections, or None if the donor changed meanwhile."""
    from latentlab.runfolder import read_json

    try:
        for file in record["files"]:
            link_or_copy(donor / file, root / file)
        still = read_json(donor / "stages.json").get(name)
    except (OSError, LatentlabError, AttributeError):
        return None
    return record["sections"] if still == record else None  # remade while we copied: make it here instead


# ---- claims: who is making a stage now --------------------------------------------------------------------

def claim_folders(places: list[Path]) -> list[Path]:
    """Where runs sharing a place say what they are making: each place that is a folder of run folders."""
    return [p / ".making" for p in places if p.is_dir() and not is_run_folder(p)]


def claim(folders: list[Path], name: str, stage_hash: str):
    """Lock this stage for this run in every claim folder: the open lock files, or the path of one that another
    run holds (then nothing is held)."""
    held = []
    for folder in folders:
        path = folder / f"{name}-{stage_hash}"
        try:
            folder.mkdir(exist_ok=True)
            handle = open(path, "a")
        except OSError:  # a place we cannot write to: no claim there, the stage is made here all the same
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            release(held)
            return path
        except OSError:  # a filesystem without locks: no claim there
            handle.close()
            continue
        held.append(handle)
    return held


def release(held) -> None:
    for handle in held if isinstance(held, list) else []:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def wait_for(path: Path) -> None:
    """Until the run that holds the claim at `path` has made its stage (or died)."""
    try:
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:  # no locks there after all: look again in a second, without spinning
        time.sleep(1)
