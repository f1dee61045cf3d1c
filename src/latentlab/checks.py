"""Trust no input: every setting is checked before the first stage starts, every run file when it is read.

Each check raises LatentlabError with one line naming the setting (as --set writes it) or the file:
- `check_fields(config)`: every field's type and range (FIELDS below; `latentlab run --help` prints them);
- `check_data_limits(config, root)`: the limits the data sets (images of the rarest digit, test images,
  ...), from the label files alone, so a setting too large for the data costs a fraction of a second,
  not the stages before the one that would have failed;
- `config_from_json`, `read_stages`, `read_metrics`, `read_split`: the run's files, by type, not only syntax;
- `check_checkpoint`: the kind asked for, the model's arguments, finite weights, the code statistics.
"""
import fcntl
import math
import os
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np

from latentlab.config import Config, from_dict
from latentlab.errors import LatentlabError

# Every seed derived from the run's (seed * 1000 + k, seed + 1, SeedSequence, crc32 mixes) stays a valid
# seed for torch, numpy and scikit-learn up to here; the demo's seed box has the same limit.
MAX_SEED = 2**31 - 1
N_TRAIN, N_VAL = 55_000, 5_000    # data.N_TRAIN, data.N_VAL (data.py imports nothing heavy, but keep this leaf)
VOTE_NEIGHBOURS = 10              # fewshot.VOTE_NEIGHBOURS: new codes take the vote of this many training codes
MIN_SAMPLES = 10                  # evaluation asks for every digit; fewer samples leave a digit without one
MAX_MIXTURE = 1000                # components: beyond this the responsibilities alone outgrow memory


def whole(low: int, high: int) -> tuple:
    return ("int", low, high)


def number(low: float, high: float, low_open: bool = False, high_open: bool = False) -> tuple:
    return ("float", low, high, low_open, high_open)


def choice(*options: str) -> tuple:
    return ("choice", options)


GAN = {
    "steps": whole(1, 10_000_000), "noise_dim": whole(1, 4096), "hidden": whole(1, 8192),
    "batch_size": whole(1, 65_536), "lr": number(0, 1, low_open=True), "loss": choice("nonsaturating", "hinge"),
    "r1": number(0, 10_000), "r1_every": whole(1, 10_000_000), "ema": number(0, 1, high_open=True),
    "beta1": number(0, 1, high_open=True), "checkpoint_every": whole(1, 10_000_000), "log_every": whole(1, 10_000_000),
}
# The type and range of every setting, by the name --set uses.
FIELDS = {
    "seed": whole(0, MAX_SEED), "device": choice("auto", "cpu", "cuda"), "data_dir": ("folder",), "quick": ("bool",),
    "stage_workers": whole(0, 2),
    "autoencoder": {"latent_dim": whole(1, 1024), "width": whole(1, 256), "epochs": whole(1, 1000),
                    "batch_size": whole(1, N_TRAIN), "lr": number(0, 1, low_open=True), "train_limit": whole(0, N_TRAIN)},
    "classifier": {"epochs": whole(1, 1000), "batch_size": whole(1, N_TRAIN), "lr": number(0, 1, low_open=True),
                   "width": whole(1, 256), "train_limit": whole(0, N_TRAIN), "seed": whole(0, MAX_SEED),
                   "shipped": ("bool",)},
    "fewshot": {"labels_per_class": whole(1, N_TRAIN // 10), "draw": choice("balanced", "random"),
                "draws": whole(1, 100), "epochs": whole(1, 100_000), "end_to_end_draws": whole(0, 100),
                "curve_every": whole(1, 100_000), "curve_images": whole(1, N_VAL), "neighbours": whole(1, 1000),
                "balance": number(0, 1), "deskew": ("bool",), "self_train_epochs": whole(0, 1000),
                "train_limit": whole(0, N_TRAIN)},
    "gan": GAN, "cgan": GAN,
    "flow": {"steps": whole(1, 10_000_000), "batch_size": whole(1, 65_536), "lr": number(0, 1, low_open=True),
             "hidden": whole(1, 8192), "layers": whole(1, 64), "embed_dim": whole(2, 4096),
             "label_dropout": number(0, 1, high_open=True), "ema": number(0, 1, high_open=True),
             "guidance": number(0, 20), "guidance_rescale": number(0, 1),
             "guidance_reference": number(0, 1), "no_digit_temperature": number(0, 4, low_open=True),
             "solver": choice("euler", "midpoint", "heun"),
             "time_sampling": choice("uniform", "logit_normal"), "no_digit_target": choice("path", "own_digit"),
             "no_digit_sampling": choice("field", "digit_mixture"), "digit_loss_weight": number(0, 100),
             "ode_steps": whole(1, 1000),
             "log_every": whole(1, 10_000_000)},
    "interpolation": {"pairs": whole(2, 5000), "steps": whole(3, 1000)},
    "evaluation": {"samples": whole(MIN_SAMPLES, 100_000), "k": whole(1, 100), "gmm_components": whole(1, MAX_MIXTURE),
                   "gmm_components_per_digit": whole(1, MAX_MIXTURE), "gmm_fit_limit": whole(2, N_TRAIN),
                   "gmm_tol": number(0, 1, low_open=True), "flow_sweep_samples": whole(MIN_SAMPLES, 100_000)},
}
# What the data and the other settings limit, checked at start too (for `latentlab run --help`).
RELATIONS = [
    "autoencoder/classifier.batch_size <= their training images (train_limit, 0 = all 55,000)",
    f"fewshot: labels_per_class <= the images of its rarest digit (balanced) or 10 x labels_per_class <= its images "
    f"(random); neighbours < its images; its images >= {VOTE_NEIGHBOURS} and > autoencoder.latent_dim "
    "(end_to_end_draws above draws means every draw, as 0 does); self_train_epochs > 0 needs deskew",
    "flow: embed_dim even (sine and cosine halves); evaluation: k < flow_sweep_samples (at most samples are used)",
    "interpolation: 2 x pairs <= the test images (10,000); pairs x (steps - 2) <= the 5,000 validation images",
    "evaluation: k < samples <= the test images (10,000); gmm_components <= gmm_fit_limit; "
    "gmm_components_per_digit <= the training images of the rarest digit",
    "--data-dir: every digit 0-9 in the training and validation split",
]


def describe(spec: tuple) -> str:
    """A setting's accepted values in words, e.g. 'a whole number 1-1024' or 'a number in (0, 1]'."""
    kind = spec[0]
    if kind == "int":
        return f"a whole number {spec[1]}-{spec[2]}"
    if kind == "float":
        _, low, high, low_open, high_open = spec
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if kind == "choice":
        return "one of " + ", ".join(spec[1])
    if kind == "bool":
        return "true or false"
    return "a folder of MNIST-format IDX files, or null for the shipped MNIST"


def settings_help() -> str:
    """Every setting with its limits, for `latentlab run --help`."""
    lines = ["settings (--set SECTION.KEY=VALUE) and what each accepts:"]
    for name, spec in FIELDS.items():
        if isinstance(spec, dict):
            lines += [f"  {name}.{key}: {describe(s)}" for key, s in spec.items()]
        else:
            lines.append(f"  {name}: {describe(spec)}")
    lines.append("limits set by the data and by other settings (also checked before the first stage):")
    lines += [f"  {line}" for line in RELATIONS]
    return "\n".join(lines)


def kind_of(value) -> str:
    """A JSON-ish name of a value's type, for errors."""
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
            int: "a whole number", float: "a number"}.get(type(value), type(value).__name__)


def check_value(name: str, value, spec: tuple) -> None:
    kind = spec[0]
    wrong = LatentlabError(f"{name}={value!r}: must be {describe(spec)}")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not spec[1] <= value <= spec[2]:
            raise wrong
    elif kind == "float":
        _, low, high, low_open, high_open = spec
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise wrong
    elif kind == "choice":
        if value not in spec[1]:
            raise wrong
    elif kind == "bool":
        if not isinstance(value, bool):
            raise wrong
    elif value is not None and (not isinstance(value, str) or not value):
        raise wrong


def check_fields(config: Config) -> None:
    """Every field of every section: type and range; then the relations between fields."""
    for name, spec in FIELDS.items():
        if isinstance(spec, dict):
            section = getattr(config, name)
            for key, s in spec.items():
                check_value(f"{name}.{key}", getattr(section, key), s)
        else:
            check_value(name, getattr(config, name), spec)
    for name in ("autoencoder", "classifier"):
        cfg = getattr(config, name)
        images = cfg.train_limit or N_TRAIN
        if cfg.batch_size > images:
            raise LatentlabError(f"{name}.batch_size={cfg.batch_size}: larger than its {images} training images "
                                 f"({name}.train_limit={cfg.train_limit})")
    fs = config.fewshot
    images = fs.train_limit or N_TRAIN
    least = max(VOTE_NEIGHBOURS, fs.neighbours + 1, config.autoencoder.latent_dim + 1)
    if images < least:
        raise LatentlabError(f"fewshot.train_limit={fs.train_limit}: the graph needs at least {least} training images "
                             f"(more than fewshot.neighbours={fs.neighbours} and autoencoder.latent_dim="
                             f"{config.autoencoder.latent_dim}, and at least {VOTE_NEIGHBOURS} to vote)")
    if fs.self_train_epochs and not fs.deskew:
        raise LatentlabError(f"fewshot.self_train_epochs={fs.self_train_epochs}: the CNN learns the deskewed graph's "
                             "labels, so it needs fewshot.deskew=true")
    it = config.interpolation
    if it.pairs * (it.steps - 2) > N_VAL:
        raise LatentlabError(f"interpolation.pairs={it.pairs}, steps={it.steps}: {it.pairs * (it.steps - 2)} in-between "
                             f"images, more than the {N_VAL} validation images their floor compares with")
    ev = config.evaluation
    if not ev.k < ev.samples:
        raise LatentlabError(f"evaluation.k={ev.k}: must be less than evaluation.samples ({ev.samples})")
    if ev.gmm_components > ev.gmm_fit_limit:
        raise LatentlabError(f"evaluation.gmm_components={ev.gmm_components}: more than the {ev.gmm_fit_limit} codes "
                             "it is fitted on (evaluation.gmm_fit_limit)")
    flow = config.flow
    if flow.embed_dim % 2:
        raise LatentlabError(f"flow.embed_dim={flow.embed_dim}: must be even (sine and cosine halves)")
    if not ev.k < ev.flow_sweep_samples:  # above evaluation.samples it takes that many
        raise LatentlabError(f"evaluation.flow_sweep_samples={ev.flow_sweep_samples}: must be more than "
                             f"evaluation.k ({ev.k})")


# ---- the limits only the data knows ---------------------------------------------------------------

def _labels(data_dir) -> tuple[np.ndarray, int]:
    """All training labels and the number of test images, from the label files only (fast)."""
    from latentlab import data

    folder = data.shipped_dir() if data_dir is None else Path(data_dir)
    if not folder.is_dir():
        raise LatentlabError(f"--data-dir {folder}: not a folder")
    parsed = {}
    for key in ("train_labels", "test_labels"):
        raw, path = data._read_file(folder, data.FILES[key])
        parsed[key] = data._parse_idx(raw, path, data.LABEL_MAGIC)
        if parsed[key].ndim != 1 or parsed[key].max(initial=0) > 9:
            raise LatentlabError(f"{path}: not a label file of digits 0-9")
    if len(parsed["train_labels"]) < N_TRAIN + N_VAL:
        raise LatentlabError(f"{folder}: need {N_TRAIN + N_VAL} training images, found {len(parsed['train_labels'])}")
    return parsed["train_labels"].astype(np.int64), len(parsed["test_labels"])


def check_data_limits(config: Config, root=None) -> None:
    """The settings whose limit is in the data: images per digit, test images. `root`: the run folder, if any."""
    from latentlab import data

    labels, test_images = _labels(config.data_dir)
    split_path = Path(root) / "split.npz" if root is not None else None
    if split_path is not None and split_path.exists():
        split = read_split(split_path, len(labels))
    else:
        split = data.split_indices(config.seed, len(labels))
    train, val = labels[split["train"]], labels[split["val"]]
    for part, values in (("training", train), ("validation", val)):
        missing = sorted(set(range(10)) - set(values.tolist()))
        if missing:
            raise LatentlabError(f"the {part} split has no image of class {missing[0]}; every class 0-9 must be there")
    fs = config.fewshot
    pool = train[:fs.train_limit or len(train)]
    rarest = int(np.bincount(pool, minlength=10).min())
    if fs.draw == "balanced" and fs.labels_per_class > rarest:
        raise LatentlabError(f"fewshot.labels_per_class={fs.labels_per_class}: the rarest class has only {rarest} of "
                             f"the {len(pool)} training images it draws from (fewshot.train_limit={fs.train_limit})")
    if fs.draw == "random" and 10 * fs.labels_per_class > len(pool):
        raise LatentlabError(f"fewshot.labels_per_class={fs.labels_per_class}: {10 * fs.labels_per_class} labels, "
                             f"more than the {len(pool)} training images (fewshot.train_limit={fs.train_limit})")
    if 2 * config.interpolation.pairs > test_images:
        raise LatentlabError(f"interpolation.pairs={config.interpolation.pairs}: needs {2 * config.interpolation.pairs} "
                             f"test images, there are {test_images}")
    ev = config.evaluation
    if ev.samples > test_images:
        raise LatentlabError(f"evaluation.samples={ev.samples}: more than the {test_images} test images they are "
                             "compared with")
    rarest = int(np.bincount(train, minlength=10).min())
    if ev.gmm_components_per_digit > rarest:
        raise LatentlabError(f"evaluation.gmm_components_per_digit={ev.gmm_components_per_digit}: more than the "
                             f"{rarest} training codes of the rarest class it is fitted on")


def check_config(config: Config, root=None) -> None:
    """All of it, before the first stage: types and ranges, relations, the data's limits, the device."""
    from latentlab.context import resolve_device

    check_fields(config)
    check_data_limits(config, root)
    resolve_device(config.device)


# ---- the run's files ------------------------------------------------------------------------------

def config_from_json(path) -> Config:
    """config.json, checked: an object of known sections and settings of the right types and ranges."""
    from latentlab.runfolder import read_json

    path = Path(path)
    values = read_json(path)
    if not isinstance(values, dict):
        raise LatentlabError(f"{path}: expected an object of settings, found {kind_of(values)}")
    known = {f.name: f for f in fields(Config)}
    default = Config()
    for key, value in values.items():
        if key == "environment":
            if not isinstance(value, dict):
                raise LatentlabError(f"{path}: environment must be an object, found {kind_of(value)}")
            continue
        if key not in known:
            raise LatentlabError(f"{path}: unknown setting {key!r}")
        section = getattr(default, key)
        if is_dataclass(section):
            if not isinstance(value, dict):
                raise LatentlabError(f"{path}: {key} must be an object of settings, found {kind_of(value)}")
            names = {f.name for f in fields(section)}
            for sub in value:
                if sub not in names:
                    raise LatentlabError(f"{path}: unknown setting {key}.{sub}")
    config = from_dict(values)
    try:
        check_fields(config)
    except LatentlabError as e:
        raise LatentlabError(f"{path}: {e}") from None
    return config


def read_stages(path) -> dict:
    """stages.json: an object of stage name -> {"hash": text, ...}."""
    from latentlab.runfolder import read_json

    records = read_json(path)
    if not isinstance(records, dict):
        raise LatentlabError(f"{path}: expected an object of stage records, found {kind_of(records)}")
    for name, record in records.items():
        if not isinstance(record, dict) or not isinstance(record.get("hash"), str):
            raise LatentlabError(f"{path}: the record of stage {name!r} must be an object with a text \"hash\"")
    return records


def read_metrics(path) -> dict:
    """metrics.json: an object of sections, each an object; timings are numbers."""
    from latentlab.runfolder import read_json

    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise LatentlabError(f"{path}: expected an object of sections, found {kind_of(metrics)}")
    for name, section in metrics.items():
        if not isinstance(section, dict):
            raise LatentlabError(f"{path}: section {name!r} must be an object, found {kind_of(section)}")
    for name, seconds in metrics.get("timings_s", {}).items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise LatentlabError(f"{path}: timings_s.{name} must be a number, found {kind_of(seconds)}")
    return metrics


def read_split(path, n_images: int) -> dict[str, np.ndarray]:
    """split.npz: `train` (55,000) and `val` (5,000) distinct indices into the training images."""
    try:
        with np.load(path) as f:
            split = {key: f[key] for key in ("train", "val")}
    except Exception as e:  # a damaged zip, a missing key, a pickled object: numpy raises many kinds
        raise LatentlabError(f"{path}: damaged split file ({type(e).__name__}); delete it to redraw") from None
    for key, size in (("train", N_TRAIN), ("val", N_VAL)):
        a = split[key]
        if a.dtype.kind not in "iu" or a.shape != (size,):
            raise LatentlabError(f"{path}: {key} must be {size} whole-number indices, found {a.dtype} {a.shape}; "
                                 "delete it to redraw")
        if a.min() < 0 or a.max() >= n_images or len(np.unique(a)) != size:
            raise LatentlabError(f"{path}: {key} indices must be distinct and within 0-{n_images - 1}; delete it to redraw")
    if np.intersect1d(split["train"], split["val"]).size:
        raise LatentlabError(f"{path}: train and val share images; delete it to redraw")
    return {k: v.astype(np.int64) for k, v in split.items()}


def check_checkpoint(path, checkpoint: dict, kind: str) -> None:
    """The kind asked for, plain model arguments, finite weights; for the generators the code statistics too."""
    import torch

    found = checkpoint.get("kind")
    if found != kind:
        raise LatentlabError(f"{path}: holds {'a ' + repr(found) if isinstance(found, str) else 'no'} model kind, "
                             f"not the {kind!r} asked for; a checkpoint of another model was put here")
    args = checkpoint["model_args"]
    if not isinstance(args, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                             and 0 <= v <= 65_536 for k, v in args.items()):
        raise LatentlabError(f"{path}: model_args must map names to whole numbers 0-65536")
    # no larger than a run's settings can make: a model of 65,536 layers takes a minute to build, even on the meta device
    for key, value in args.items():
        rule = FIELDS.get(kind, {}).get(key)
        if rule and rule[0] == "int" and not rule[1] <= value <= rule[2]:
            raise LatentlabError(f"{path}: model_args {key}={value} is outside what {kind}.{key} allows "
                                 f"({rule[1]}-{rule[2]})")
    weights = checkpoint["state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) and v.layout == torch.strided
                                                and v.device.type != "meta" for v in weights.values()):
        raise LatentlabError(f"{path}: state_dict must map names to tensors (dense, with their values)")
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LatentlabError(f"{path}: weight {name} holds NaN or infinite values")
    if kind in ("gan", "cgan") and args.get("num_classes") != (10 if kind == "cgan" else 0):
        raise LatentlabError(f"{path}: num_classes={args.get('num_classes')} does not fit a {kind} checkpoint")
    if kind == "flow":  # what its config had to be: an odd embedding builds, then fails in the first pass
        retrain = f"retrain it with `latentlab train-flow --run {Path(path).parent.parent} --force`"
        if not isinstance(args.get("embed_dim"), int) or args["embed_dim"] < 2 or args["embed_dim"] % 2:
            raise LatentlabError(f"{path}: embed_dim={args.get('embed_dim')} must be even; {retrain}")
        if args.get("digit_head", 0) not in (0, 1):  # absent: from before the head
            raise LatentlabError(f"{path}: digit_head={args['digit_head']} must be 0 or 1; {retrain}")
        sampling = checkpoint.get("sampling")
        if not isinstance(sampling, dict) or not {"guidance", "solver", "ode_steps"} <= set(sampling):
            raise LatentlabError(f"{path}: sampling settings missing or unreadable; {retrain}")
        # no rescale, reference or temperature: a checkpoint from before the setting
        for key in ("guidance", "solver", "ode_steps", "guidance_rescale", "guidance_reference", "no_digit_temperature"):
            if key not in sampling:
                continue
            try:
                check_value(f"sampling.{key}", sampling[key], FIELDS["flow"][key])
            except LatentlabError as e:
                raise LatentlabError(f"{path}: {e}") from None
    # the code statistics: the GANs' scale, kept by the autoencoder too (older AE checkpoints lack them)
    if kind in ("gan", "cgan", "flow") or (kind == "autoencoder" and "code_mean" in checkpoint):
        latent = args.get("latent_dim")
        for key in ("code_mean", "code_std"):
            stat = checkpoint.get(key)
            if not isinstance(stat, torch.Tensor) or not stat.is_floating_point() or tuple(stat.shape) != (latent,):
                raise LatentlabError(f"{path}: {key} must be a float tensor of the code's size ({latent})")
            if not torch.isfinite(stat).all():
                raise LatentlabError(f"{path}: {key} holds NaN or infinite values")
        if not (checkpoint["code_std"] > 0).all():
            raise LatentlabError(f"{path}: code_std must be > 0 in every dimension")


def writer(root) -> str | None:
    """Who holds the run folder's lock ("pid N"), if another process does; never creates the lock file."""
    path = Path(root) / ".lock"
    try:
        handle = open(path)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = handle.read().strip() or "another process"
            return None if owner == f"pid {os.getpid()}" else owner
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


# ---- what a stage command needs before it starts ----------------------------------------------------

# The stages that make a checkpoint, and the command that makes each.
MADE_BY = {"autoencoder": "train-ae", "classifier": "train-classifier", "gan": "train-gan", "cgan": "train-cgan",
           "flow": "train-flow"}


def check_needs(root, stage: str) -> None:
    """The checkpoints of the stages `stage` reads are there and sound, or one line naming the command that
    makes them (checked before anything is written)."""
    from latentlab.pipeline import STAGES
    from latentlab.runfolder import Run

    reads = next((s.reads for s in STAGES if s.name == stage), ())
    for name in (r for r in reads if r in MADE_BY):
        run = Run(root)  # here, not above: a stage that reads no checkpoint may start a folder that is not there yet
        checkpoint = run.load_checkpoint(name, made_by=MADE_BY[name])
        check_checkpoint(run.checkpoints / f"{name}.pt", checkpoint, name)


def check_own_settings(before: dict, after: dict, stage: str, command: str) -> None:
    """A stage command on an existing run changes only its own section (and the device): the earlier stages
    were made with the run's seed, data and settings, and config.json must keep saying so."""
    for key, value in after.items():
        if key in (stage, "device", "stage_workers", "environment") or before.get(key) == value:
            continue
        if isinstance(value, dict):
            sub = next(k for k in value if before.get(key, {}).get(k) != value[k])
            key, was, value = f"{key}.{sub}", before.get(key, {}).get(sub), value[sub]
        else:
            was = before.get(key)
        raise LatentlabError(f"{key}={value!r}: this run was made with {key}={was!r}, and `latentlab {command}` changes "
                             f"only {stage}.* settings; start another run (`latentlab run --out NEW ...`) for this")


def check_run_files(root) -> None:
    """A run folder's own JSON files, checked before a command writes anything to it (split.npz: with the data)."""
    root = Path(root)
    for name, read in (("config.json", config_from_json), ("stages.json", read_stages), ("metrics.json", read_metrics)):
        if (root / name).exists():
            read(root / name)
