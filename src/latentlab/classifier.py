"""Stage 2: the project's own digit classifier, the judge of generated images.

Inception weights cannot be downloaded here, so quality is measured in the penultimate features of a CNN
trained on MNIST itself (the usual substitute); such distances are only comparable under the same classifier.
On the shipped MNIST with the default settings, the judge shipped with latentlab is taken instead of trained
(`shipped_judge`): the one this stage made, so every run, seed and device is scored with the same yardstick.
"""
import hashlib
import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from latentlab import data, pixels
from latentlab.config import ClassifierConfig
from latentlab.context import Context, set_threads, sub_seed
from latentlab.errors import LatentlabError
from latentlab.metrics import Reference
from latentlab.models import DigitClassifier, adam, batched, device_of, stepper
from latentlab.runfolder import Run, atomic_write


def _batched(fn, model: DigitClassifier, images, batch_size: int | None) -> torch.Tensor:
    """fn over images (uint8 arrays or float tensors, anywhere) on the model's device; results stay there."""
    return batched(fn, pixels.to_float(images), device_of(model.eval()), batch_size)


def predict_proba(model: DigitClassifier, images, batch_size: int | None = None) -> np.ndarray:
    """(N, 10) softmax probabilities."""
    return _batched(lambda x: model(x).softmax(dim=1), model, images, batch_size).cpu().numpy()


def features(model: DigitClassifier, images, batch_size: int | None = None) -> torch.Tensor:
    """(N, F) penultimate activations, on the model's device (for Frechet distance and precision/recall)."""
    return _batched(model.features, model, images, batch_size)


def features_and_proba(model: DigitClassifier, images, batch_size: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """`features` and `predict_proba` in one pass: the head applied to the penultimate features gives the logits."""
    feats = features(model, images, batch_size)
    with torch.no_grad():
        proba = model.head(feats).softmax(dim=1).cpu().numpy()
    return feats, proba


def accuracy(model: DigitClassifier, images, labels) -> float:
    return float((predict_proba(model, images).argmax(axis=1) == np.asarray(labels)).mean())


def train_classifier(cfg: ClassifierConfig, train: torch.Tensor, train_labels: np.ndarray, val: torch.Tensor,
                     val_labels: np.ndarray, *, seed: int, device=torch.device("cpu")) -> tuple[DigitClassifier, dict]:
    """Adam with a one-cycle learning rate on cross-entropy; returns the model and per-epoch validation accuracy."""
    torch.manual_seed(seed)
    model = DigitClassifier(width=cfg.width).to(device)  # conv weights channels-last (models.py)
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch < 1:
        raise LatentlabError(f"classifier: batch size {cfg.batch_size} is larger than the {len(train)} training images")
    optimizer = adam(model.parameters(), lr=cfg.lr)
    # one-cycle: warm up, then anneal to ~0, which is what makes 2-3 epochs enough
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    train, labels = train.to(device), torch.as_tensor(np.asarray(train_labels)).to(device)
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros((), device=device)  # the epoch's summed loss, on the device, read once an epoch

    def forward_backward(batch: torch.Tensor) -> None:  # leaves the gradients in the parameters' .grad
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(train[batch]), labels[batch])
        loss.backward()
        total.add_(loss.detach())

    # On CUDA the forward and backward pass is one CUDA graph replay after a few eager steps (training 10.0 ->
    # 5.3-6.0 s on an H200). The optimizer steps outside it, since the one-cycle schedule changes its learning
    # rate and momentum every step; the graph owns the .grad buffers and rewrites them in every replay.
    run_forward_backward = stepper(forward_backward, [optimizer],
                                   (torch.zeros(cfg.batch_size, dtype=torch.long, device=device),),
                                   capture=device.type == "cuda")
    history = {"train_loss": [], "val_accuracy": []}
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="classifier", unit="step", leave=False, mininterval=0.5)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).to(device)
        total.zero_()
        for step in range(steps_per_epoch):
            run_forward_backward(order[step * cfg.batch_size:(step + 1) * cfg.batch_size])
            optimizer.step()
            schedule.step()
            bar.update()
        history["train_loss"].append(total.item() / steps_per_epoch)
        history["val_accuracy"].append(accuracy(model, val, val_labels))
        bar.set_postfix(epoch=epoch + 1, val_acc=f"{history['val_accuracy'][-1]:.4f}")
    bar.close()
    return model.eval(), history


def checkpoint(model: DigitClassifier, cfg: ClassifierConfig) -> dict:
    return {"kind": "classifier", "model_args": {"width": cfg.width},
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}


def load_classifier(run: Run) -> DigitClassifier:
    return run.load_model("classifier", DigitClassifier, "train-classifier")[0]


TEST_FEATURES = "test_features.pt"


def write_test_reference(run: Run, reference: Reference) -> None:
    """DIR/test_features.pt: the judge's features of the test images and their k-NN radii. The classifier stage
    writes it, so that the stages that compare with the test images (baselines, interpolation, evaluation: often
    in other processes, or other trials of a sweep) load them instead of passing the 10k images through the
    judge again (1.4-2 s each on one CPU thread)."""
    atomic_write(run.root / TEST_FEATURES, lambda f: torch.save(
        {"classifier_sha256": run.checkpoint_sha256("classifier"), "k": reference.k, "features": reference.features.cpu(),
         "radii": reference.radii.cpu()}, f))


def read_test_reference(run: Run, count: int, k: int, device) -> Reference | None:
    """The saved reference if it is the current judge's, of `count` finite feature rows; its radii only if made
    with this k. Else None (made anew: a cache, never a source of truth)."""
    try:
        saved = torch.load(run.root / TEST_FEATURES, map_location="cpu", weights_only=True)
        if saved.get("classifier_sha256") != run.checkpoint_sha256("classifier"):
            return None
        feats, radii = saved["features"], saved["radii"]
        if not (feats.dtype == torch.float32 and feats.ndim == 2 and len(feats) == count and radii.shape == (count,)
                and bool(torch.isfinite(feats).all()) and bool(torch.isfinite(radii).all())):
            return None
    except Exception:  # missing, damaged or foreign: making it again is always right
        return None
    return Reference(feats.to(device), k=k, radii=radii if saved.get("k") == k else None)


def reference_of_test_images(ctx: Context, classifier: DigitClassifier) -> Reference:
    """The test images' statistics in the classifier's features: what every generator and path is compared with.

    `classifier` is the run's saved one. Read from DIR/test_features.pt where the classifier stage left it, else
    made here; kept on the context while that checkpoint is unchanged, so that the stages in one process share
    its features and k-NN radii."""
    key = _reference_key(ctx)
    if ctx.test_reference is None or ctx.test_reference[0] != key:
        k = ctx.config.evaluation.k
        real = (read_test_reference(ctx.run, len(ctx.dataset.test_images), k, ctx.device)
                or Reference(features(classifier, ctx.images("test")), k=k))
        ctx.test_reference = key, real
    return ctx.test_reference[1]


def _reference_key(ctx: Context) -> tuple:
    stamp = (ctx.run.checkpoints / "classifier.pt").stat()
    return stamp.st_mtime_ns, stamp.st_size, ctx.config.evaluation.k


def train_judge(ctx: Context, cfg: ClassifierConfig) -> tuple[DigitClassifier, dict, dict]:
    """The judge as `cfg` makes it, the same whatever the run's seed: trained with cfg.seed on the 55k / 5k split
    that seed draws (the run's own split, already on the device, where the seeds agree). Returns the model, its
    history, and how many images it trained on and for how many seconds."""
    if cfg.seed == ctx.config.seed:
        parts = {part: (ctx.images(part), ctx.labels(part)) for part in ("train", "val")}
    else:
        rows = data.split_indices(cfg.seed, len(ctx.dataset.train_images))
        parts = {part: (pixels.to_float(torch.from_numpy(ctx.dataset.train_images[rows[part]]).to(ctx.device)),
                        ctx.dataset.train_labels[rows[part]]) for part in ("train", "val")}
    (train, train_labels), (val, val_labels) = parts["train"], parts["val"]
    if cfg.train_limit:
        train, train_labels = train[:cfg.train_limit], train_labels[:cfg.train_limit]
    start = time.perf_counter()
    model, history = train_classifier(cfg, train, train_labels, val, val_labels,
                                      seed=sub_seed(cfg.seed, "classifier"), device=ctx.device)
    return model, history, {"train_images": len(train), "train_seconds": round(time.perf_counter() - start, 2)}


SHIPPED = Path(__file__).parent / "judge"  # classifier.pt and classifier.json, written by scripts/ship_judge.py


def judge_settings(cfg: ClassifierConfig) -> dict:
    """The settings that make a judge (whether to take the shipped one is not one of them)."""
    return {k: v for k, v in asdict(cfg).items() if k != "shipped"}


def shipped_judge(ctx: Context, cfg: ClassifierConfig, folder: Path | None = None) -> tuple[bytes, dict] | None:
    """The shipped judge's checkpoint file and its record, where it is the judge these settings would train here:
    `cfg.shipped`, the shipped MNIST, and the settings it was made with. Else None (the stage trains one). A
    damaged shipped file is an error, never a silently different judge."""
    if not cfg.shipped or ctx.config.data_dir is not None:
        return None
    folder = folder or SHIPPED
    try:
        record = json.loads((folder / "classifier.json").read_text())
        made = (folder / "classifier.pt").read_bytes()
        if not all(isinstance(record.get(key), dict) for key in ("settings", "section", "made")):
            raise ValueError("classifier.json lacks its settings, section or provenance")
    except (OSError, ValueError, AttributeError) as e:
        raise LatentlabError(f"{folder}: the shipped judge cannot be read ({type(e).__name__}); reinstall latentlab, "
                             "or --set classifier.shipped=false to train the judge in the run") from None
    if record.get("settings") != judge_settings(cfg):
        return None
    if hashlib.sha256(made).hexdigest() != record.get("sha256"):
        raise LatentlabError(f"{folder / 'classifier.pt'}: damaged (not the file shipped); reinstall latentlab, "
                             "or --set classifier.shipped=false to train the judge in the run")
    return made, record


def stage(ctx: Context) -> dict:
    """Train the classifier on its split's training images (or take the shipped one, `shipped_judge`), save it,
    report validation and test accuracy (the test accuracy measured here, on this run's device)."""
    cfg = ctx.config.classifier
    set_threads(ctx.threads)
    shipped = shipped_judge(ctx, cfg)
    if shipped is not None:
        made, record = shipped
        ctx.run.save_checkpoint_bytes("classifier", made)
        model = load_classifier(ctx.run).to(ctx.device)
        section = {**record["section"], "shipped": record["made"]}
    else:
        model, history, trained = train_judge(ctx, cfg)
        ctx.run.save_checkpoint("classifier", checkpoint(model, cfg))
        section = {"val_accuracy": history["val_accuracy"][-1], "epochs": cfg.epochs, **trained, "seed": cfg.seed,
                   "feature_dim": model.head[-1].in_features, "width": cfg.width,
                   "history": {k: [round(v, 6) for v in vs] for k, vs in history.items()}}
    # One pass of the test images gives the test accuracy and the reference every later comparison reads
    feats, proba = features_and_proba(model, ctx.images("test"))
    real = Reference(feats, k=ctx.config.evaluation.k)
    write_test_reference(ctx.run, real)
    ctx.test_reference = _reference_key(ctx), real
    return {"classifier": {**section, "test_accuracy": float((proba.argmax(axis=1) == ctx.labels("test")).mean()),
                           "device": str(ctx.device)}}


def ship(run: Run, cfg: ClassifierConfig, folder: Path | None = None) -> dict:
    """Write `run`'s judge, made by the stage above with `cfg`, into `folder` as the shipped judge; returns its
    record. Only the judge of the shipped MNIST and the default settings is shipped (scripts/ship_judge.py)."""
    from latentlab.runfolder import environment

    judge = run.metrics()["classifier"]
    section = {k: v for k, v in judge.items() if k not in ("test_accuracy", "device", "shipped")}
    folder = folder or SHIPPED
    made = (run.checkpoints / "classifier.pt").read_bytes()
    torch.load(io.BytesIO(made), weights_only=True)  # a readable checkpoint, or this fails here and not in a run
    record = {"settings": judge_settings(cfg), "sha256": hashlib.sha256(made).hexdigest(), "section": section,
              "made": {"by": "latentlab train-classifier --set classifier.shipped=false",
                       "test_accuracy": judge["test_accuracy"], "device": judge["device"], **environment()}}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "classifier.pt", lambda f: f.write(made))
    atomic_write(folder / "classifier.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
    return record
