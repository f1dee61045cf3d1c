"""A run folder: config.json, metrics.json, figures/, checkpoints/, and atomic checkpoint files.

    DIR/config.json     every resolved setting, the seed, versions and the git commit
    DIR/metrics.json    nested numbers; each stage writes its own sections
    DIR/figures/        PNG figures
    DIR/checkpoints/    one .pt file per model, each enough to rebuild it without flags
"""
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import latentlab
from latentlab.errors import LatentlabError


_written: list[Path] | None = None  # while `recording`, every file atomic_write writes


@contextmanager
def recording():
    """Collect the files written in this process while inside (a stage's files, kept in its record for --reuse)."""
    global _written
    _written = []
    try:
        yield _written
    finally:
        _written = None


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give it the mode every other file of the run gets
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if _written is not None:
            _written.append(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj) -> None:
    atomic_write(Path(path), lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def read_json(path: Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LatentlabError(f"{path}: file is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LatentlabError(f"{path}: not valid JSON ({e})") from None


def environment() -> dict:
    """Versions and the git commit, saved beside the settings so a run can be traced."""
    import numpy

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "latentlab": latentlab.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "git_commit": commit,
    }


class SkipInit(TorchFunctionMode):
    """Leave torch.nn.init's functions undone, for models built on the meta device only to check shapes: there an
    embedding's normal_ runs a Python reference kernel that imports torch._dynamo, 1.5-1.7 s of a cold
    `latentlab sample --model flow`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]  # every init function's first argument
        return func(*args, **(kwargs or {}))


class Run:
    """Paths and small helpers for one run folder."""

    def __init__(self, root, *, create: bool = False):
        self.root = Path(root)
        if create:
            try:
                if self.root.exists() and not self.root.is_dir():
                    raise LatentlabError(f"{self.root}: exists and is not a folder")
                for sub in ("figures", "checkpoints"):
                    (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LatentlabError(f"{self.root}: cannot create the run folder ({e.strerror})") from None
            if not os.access(self.root, os.W_OK):
                raise LatentlabError(f"{self.root}: folder is not writable")
        elif not self.root.is_dir():
            if os.path.isfile(self.root):
                raise LatentlabError(f"{self.root}: is a file, not a run folder")
            raise LatentlabError(f"{self.root}: no such run folder (make one with `latentlab run --out {self.root}`)")

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    # metrics.json: each stage replaces its own top-level sections and its timing.
    def metrics(self) -> dict:
        from latentlab.checks import read_metrics

        path = self.root / "metrics.json"
        return read_metrics(path) if path.exists() else {}

    def update_metrics(self, sections: dict, timings: dict | None = None) -> dict:
        metrics = self.metrics()
        metrics.update(sections)
        if timings:
            metrics.setdefault("timings_s", {}).update({k: round(v, 3) for k, v in timings.items()})
        write_json(self.root / "metrics.json", metrics)
        return metrics

    def save_checkpoint(self, name: str, checkpoint: dict) -> Path:
        path = self.checkpoints / f"{name}.pt"
        atomic_write(path, lambda f: torch.save(checkpoint, f))
        return path

    def checkpoint_sha256(self, name: str) -> str:
        """SHA-256 of checkpoint `name`'s file: which model a file made from it (codes, test features) belongs to."""
        return hashlib.sha256((self.checkpoints / f"{name}.pt").read_bytes()).hexdigest()

    def save_checkpoint_bytes(self, name: str, made: bytes) -> Path:
        """A checkpoint file as it was made elsewhere (the shipped judge), byte for byte."""
        path = self.checkpoints / f"{name}.pt"
        atomic_write(path, lambda f: f.write(made))
        return path

    def load_model(self, name: str, model_class, command: str, kind: str | None = None):
        """Rebuild `model_class` from checkpoint `name` without flags; returns (model in eval mode, checkpoint).

        `command` is the latentlab subcommand that makes the checkpoint, named in the error when it is missing.
        The checkpoint must be of `kind` (default: `name`), so a file of another model is an error, never a
        silently different model; its arguments, weights and (GANs) code statistics are checked too.
        """
        from latentlab.checks import check_checkpoint

        ckpt = self.load_checkpoint(name, made_by=command)
        check_checkpoint(self.checkpoints / f"{name}.pt", ckpt, kind or name)
        try:
            with torch.device("meta"), SkipInit():  # names and shapes first, in no memory: huge arguments with small weights
                model_class(**ckpt["model_args"]).load_state_dict(ckpt["state_dict"], assign=True)  # no copy made
            model = model_class(**ckpt["model_args"])
            model.load_state_dict(ckpt["state_dict"])
        except (RuntimeError, TypeError) as e:
            detail = " ".join(str(e).split())[:80]  # torch's message spans lines; the error is one
            raise LatentlabError(f"{self.checkpoints / (name + '.pt')}: weights do not fit the model ({detail})") from None
        return model.eval(), ckpt

    def load_checkpoint(self, name: str, *, made_by: str | None = None) -> dict:
        """Checkpoint `name`'s dict; a missing file is one line, naming the latentlab command `made_by` that makes it."""
        path = self.checkpoints / f"{name}.pt"
        if not path.is_file():
            needed_by = made_by and f"train it with `latentlab {made_by} --run {self.root}`"
            from latentlab.checks import writer

            owner = writer(self.root)
            if owner:
                raise LatentlabError(f"{path}: not written yet: a latentlab command ({owner}) is writing this run "
                                     "folder now; wait for it to finish")
            if path.exists():  # a folder or another non-file in the checkpoint's place
                what = "is not a file; move it away" + (f" and {needed_by}" if needed_by else "")
            else:
                what = "is missing" + (f"; {needed_by}" if needed_by else "")
            raise LatentlabError(f"{path}: checkpoint {what}")
        return load_checkpoint_file(path)


def load_checkpoint_file(path: Path) -> dict:
    """Load a checkpoint safely (tensors and plain data only); a damaged file is a one-line error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged zip/pickle
        raise LatentlabError(f"{path}: checkpoint is corrupt or unreadable ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "model_args" not in checkpoint:
        raise LatentlabError(f"{path}: not a latentlab checkpoint")
    return checkpoint
