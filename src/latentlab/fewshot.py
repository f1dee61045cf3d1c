"""Stage: digit classification from the latent codes with only 50 labelled training images.

Two parts, both on the same label draws (5 per digit by default, several draws with their own seeds):
1. the reference study: MLPs trained on the frozen codes, and the same MLPs stacked on a copy of the
   encoder and fine-tuned end to end (the run's autoencoder is never changed);
2. graph-based semi-supervised learning, which also uses the 55k unlabelled training codes: Poisson
   learning (graphlearning) on a kNN graph of the whitened codes, then a 10-NN vote labels new codes.

Labels reach the classifiers through one door: `reveal(train_labels, indices)` is the only read of
training labels after the draw; everything downstream sees codes, images and those 50 labels. The graph
holds training codes only, so every method here is inductive: test images are never in any graph.
"""
import copy
import json
import time

import numpy as np
import scipy.sparse as sparse
import torch
import torch.nn.functional as F
from scipy.stats import mode
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.preprocessing import normalize
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from latentlab import figures
from latentlab.config import FewshotConfig
from latentlab.context import Context, set_threads
from latentlab.errors import LatentlabError

# The reference report's validation accuracy of its best MLP (one draw of 50 labels).
REFERENCE = {"seed_mlp_frozen": 0.745, "seed_mlp_end_to_end": 0.607}

# The architecture sweep: hidden layers as (width, activation); every head ends in Linear(., 10) + softmax.
ARCHITECTURES = {
    "softmax": (),                                        # multinomial logistic regression on the code
    "mlp_128_sigmoid": ((128, "sigmoid"),),
    "seed_mlp": ((128, "sigmoid"), (512, "sigmoid")),     # the reference's best
    "mlp_256_256_relu": ((256, "relu"), (256, "relu")),
}
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}
LEARNING_RATE = 1e-3   # Adam, Keras' default, as in the reference
VOTE_NEIGHBOURS = 10   # new codes take the majority label of their nearest training codes


def sub_seed(seed: int, *keys: int) -> int:
    """A seed for one part of the stage, derived from the run's seed."""
    return int(np.random.SeedSequence([seed, 3, *keys]).generate_state(1)[0])


# ---- the label draw: the only code that looks at all training labels -------------------------------

def draw_labels(train_labels: np.ndarray, *, per_class: int, draw: str, seed: int) -> np.ndarray:
    """Indices of the images an annotator labels: `per_class` of each digit, or 10 * per_class at random."""
    rng = np.random.default_rng(seed)
    if draw == "balanced":
        picks = []
        for digit in range(10):
            pool = np.flatnonzero(train_labels == digit)
            if len(pool) < per_class:
                raise LatentlabError(f"fewshot.labels_per_class={per_class}: only {len(pool)} training images "
                                     f"of digit {digit} (raise fewshot.train_limit)")
            picks.append(rng.choice(pool, per_class, replace=False))
        return np.sort(np.concatenate(picks))
    if draw == "random":
        if len(train_labels) < 10 * per_class:
            raise LatentlabError(f"fewshot.labels_per_class={per_class}: only {len(train_labels)} training images")
        return np.sort(rng.choice(len(train_labels), 10 * per_class, replace=False))
    raise LatentlabError(f"fewshot.draw={draw}: choose balanced or random")


def reveal(train_labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The labels of the drawn images: the one place a classifier's training labels come from."""
    return train_labels[indices].copy()


# ---- the reference study: MLPs, one copy per draw trained at once ----------------------------------

def make_head(layers, latent_dim: int) -> nn.Sequential:
    modules, width = [], latent_dim
    for size, activation in layers:
        modules += [nn.Linear(width, size), ACTIVATIONS[activation]()]
        width = size
    return nn.Sequential(*modules, nn.Linear(width, 10))  # logits; the softmax is in the loss


class Stacked:
    """One model per label draw, trained together: torch.func.vmap over stacked weights, so each draw's
    copy sees only its own 50 examples and follows the same updates it would alone (full batch, Adam)."""

    def __init__(self, models: list[nn.Module]):
        self.base = copy.deepcopy(models[0]).to("meta")
        params, self.buffers = stack_module_state(models)  # copies: the given modules are left untouched
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.optimizer = torch.optim.Adam(self.params.values(), lr=LEARNING_RATE)

    def _logits(self, params, buffers, inputs):
        return functional_call(self.base, (params, buffers), (inputs,))

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """inputs (draws, 50, ...), labels (draws, 50): one full-batch step of every copy."""
        logits = vmap(self._logits)(self.params, self.buffers, inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.shape[1]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, batch_size: int = 1000) -> np.ndarray:
        """Every copy's digit for each of the shared inputs (N, ...) -> (draws, N)."""
        run = vmap(self._logits, in_dims=(0, 0, None))
        return torch.cat([run(self.params, self.buffers, inputs[i:i + batch_size]).argmax(2)
                          for i in range(0, len(inputs), batch_size)], dim=1).numpy()


def train_mlps(models, inputs, labels, *, epochs: int, curve_inputs, curve_labels, curve_every: int,
               desc: str) -> tuple[np.ndarray, Stacked]:
    """Train the stacked copies; returns the validation-accuracy curve (draws, points) and the trained copies."""
    stacked = Stacked(models)
    curve = []
    for epoch in tqdm(range(epochs + 1), desc=desc, leave=False):
        if epoch == epochs or (curve_every and epoch % curve_every == 0):  # curve_every=0: the last epoch only
            curve.append((stacked.predict(curve_inputs) == curve_labels).mean(axis=1))
        if epoch < epochs:
            stacked.step(inputs, labels)
    return np.stack(curve, axis=1), stacked


# ---- graph-based semi-supervised learning on the unlabelled codes ----------------------------------

def code_graph(train_codes: np.ndarray, neighbours: int):
    """A kNN graph of the training codes, built once for all draws.

    Distances are cosine distances after PCA whitening: it equalises the code's directions, which
    here cleans the neighbourhoods (full-label 10-NN accuracy 97.5% -> 97.9%). Edge weights are
    graphlearning's self-tuned Gaussian, times the fraction of shared neighbours, which thins the
    few edges that bridge two digits. Returns the weight matrix and a function that finds each new
    code's nearest training codes.
    """
    import graphlearning as gl

    whiten = PCA(whiten=True).fit(train_codes)
    embed = lambda codes: normalize(whiten.transform(codes)).astype(np.float32)  # noqa: E731
    index = NearestNeighbors(n_neighbors=neighbours).fit(embed(train_codes))
    dist, ind = index.kneighbors()  # every training code's neighbours, itself excluded
    n = len(train_codes)
    ind = np.hstack([np.arange(n)[:, None], ind])  # graphlearning counts each point as its own first neighbour
    dist = np.hstack([np.zeros((n, 1)), dist])
    weights = gl.weightmatrix.knn(None, neighbours, knn_data=(ind, dist))
    member = sparse.csr_matrix((np.ones(ind.size), ind.ravel(), np.arange(0, ind.size + 1, neighbours + 1)),
                               shape=(n, n))
    shared = (member @ member.T).multiply(weights > 0)  # neighbours two linked codes have in common
    weights = weights.multiply(shared).tocsr() / (neighbours + 1)
    return weights, lambda codes: index.kneighbors(embed(codes), VOTE_NEIGHBOURS, return_distance=False)


def balance_weights(scores: np.ndarray, priors: np.ndarray, *, tol: float = 1e-3, max_steps: int = 1000):
    """Class weights w such that argmax(scores * w) labels each class's share `priors` of the codes.

    This is graphlearning's volume label projection (`ssl.volume_label_projection`, what its Poisson
    learning does with `class_priors`), written over a precomputed score matrix because the library's
    version recomputes scores each step and costs seconds per draw here. Balanced draws converge in a
    few hundred steps; the cap bounds the time when a random draw's label frequencies cannot be met.
    """
    w = np.ones(len(priors))
    for _ in range(max_steps):
        sizes = np.bincount(np.argmax(scores * w, axis=1), minlength=len(priors)) / len(scores)
        if np.abs(sizes - priors).max() <= tol:
            break
        w = w - 0.1 * (sizes - priors)
        w = w / w[0]
    return w


def poisson_labels(weights, indices: np.ndarray, labels: np.ndarray, balance: float) -> dict[str, np.ndarray]:
    """Labels of every training code by Poisson learning, with three decisions from one solve:
    `poisson` (argmax), `poisson_volume` (class sizes forced to the label frequencies, graphlearning's
    class_priors) and `poisson_balanced` (the geometric middle, weights ** balance: sizes pulled
    towards the priors without forcing them; digits are not exactly equally frequent)."""
    import graphlearning as gl

    classes, local = np.unique(labels, return_inverse=True)  # a random draw can miss a digit
    u = gl.ssl.poisson(weights).fit(indices, local)
    scores = (u - u.min()) / (u.max() - u.min())  # graphlearning's normalisation before class weights
    w = balance_weights(scores, np.bincount(local) / len(local))
    return {"poisson": classes[np.argmax(scores, axis=1)],
            "poisson_balanced": classes[np.argmax(scores * w ** balance, axis=1)],
            "poisson_volume": classes[np.argmax(scores * w, axis=1)]}


def vote(train_predictions: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Each new code's label: the majority label among its nearest training codes."""
    return mode(train_predictions[neighbours], axis=1).mode.ravel()


# ---- the stage --------------------------------------------------------------------------------------

def summary(per_draw: list[float]) -> dict:
    a = np.asarray(per_draw, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min())}


def stage(ctx: Context) -> dict:
    cfg: FewshotConfig = ctx.config.fewshot
    seed = ctx.config.seed
    timings = {}
    start = time.perf_counter()

    set_threads(2)  # the conv encoder gains from two threads
    train_images = ctx.images("train")
    codes = {part: ctx.codes(part) for part in ("train", "val", "test")}
    limit = cfg.train_limit or len(train_images)
    train_images, codes["train"] = train_images[:limit], codes["train"][:limit]
    val_labels, test_labels = ctx.labels("val"), ctx.labels("test")

    # The draws; after this block no training label other than the drawn ones is read.
    train_labels = ctx.labels("train")[:limit]
    draws = [draw_labels(train_labels, per_class=cfg.labels_per_class, draw=cfg.draw, seed=sub_seed(seed, 0, i))
             for i in range(cfg.draws)]
    labelled = [reveal(train_labels, idx) for idx in draws]
    del train_labels
    labels_file = ctx.run.root / "fewshot_labels.json"
    labels_file.write_text(json.dumps({"draw": cfg.draw, "train_limit": limit,
                                       "indices_into": "the run's 55k training split (split.npz['train'])",
                                       "draws": [{"indices": idx.tolist(), "labels": y.tolist()}
                                                 for idx, y in zip(draws, labelled)]}) + "\n")
    timings["codes_and_draws"] = time.perf_counter() - start

    # A fixed sample of validation images for the per-epoch curves (and the end-to-end models' validation
    # accuracy); every other method is scored on the whole validation split. The headline method is the
    # best on validation, so the test set chooses nothing.
    curve_rows = np.random.default_rng(sub_seed(seed, 1)).choice(len(val_labels), min(cfg.curve_images,
                                                                                      len(val_labels)), replace=False)
    curve_labels = val_labels[curve_rows]
    test_images = ctx.images("test")
    per_draw: dict[str, list[float]] = {}
    val_accuracy: dict[str, list[float]] = {}

    def record(name: str, test_predictions, val_predictions) -> None:
        per_draw.setdefault(name, []).extend(float((p == test_labels).mean()) for p in test_predictions)
        val_accuracy.setdefault(name, []).extend(float((p == val_labels).mean()) for p in val_predictions)

    # Baselines on the 50 labelled codes alone (scikit-learn).
    t = time.perf_counter()
    set_threads(1)
    for idx, y in zip(draws, labelled):
        x = codes["train"][idx].numpy()
        for name, model in (("logistic_regression", LogisticRegression(max_iter=2000)),
                            ("nearest_labelled", KNeighborsClassifier(1))):
            model.fit(x, y)
            record(name, [model.predict(codes["test"].numpy())], [model.predict(codes["val"].numpy())])
    timings["baselines"] = time.perf_counter() - t

    # The reference study: every architecture on frozen codes and end to end, all draws at once. Curves
    # per epoch for the reference MLP; the end-to-end regime of the other architectures runs on
    # `end_to_end_draws` draws, as each draw fine-tunes its own encoder (the costly part of the stage).
    label_tensor = torch.as_tensor(np.stack(labelled))
    val_images = ctx.images("val")[curve_rows]
    curves = {}
    for a, (arch, layers) in enumerate(ARCHITECTURES.items()):
        curve_every = cfg.curve_every if arch == "seed_mlp" else 0
        t = time.perf_counter()
        set_threads(1)  # small MLPs: one thread is several times faster than two here
        torch.manual_seed(sub_seed(seed, 2, a))
        heads = [make_head(layers, codes["train"].shape[1]) for _ in draws]
        curve, stacked = train_mlps(
            heads, torch.stack([codes["train"][idx] for idx in draws]), label_tensor, epochs=cfg.epochs,
            curve_inputs=codes["val"][curve_rows], curve_labels=curve_labels, curve_every=curve_every,
            desc=f"{arch} frozen")
        record(f"{arch}_frozen", stacked.predict(codes["test"]), stacked.predict(codes["val"]))
        curves[f"{arch}_frozen"] = curve
        timings[f"{arch}_frozen"] = time.perf_counter() - t

        t = time.perf_counter()
        set_threads(2)
        e2e_draws = draws if arch == "seed_mlp" else draws[:cfg.end_to_end_draws or len(draws)]
        torch.manual_seed(sub_seed(seed, 3, a))
        models = [nn.Sequential(copy.deepcopy(ctx.autoencoder.encoder), make_head(layers, codes["train"].shape[1]))
                  for _ in e2e_draws]
        curve, stacked = train_mlps(
            models, torch.stack([train_images[idx] for idx in e2e_draws]), label_tensor[:len(e2e_draws)],
            epochs=cfg.epochs, curve_inputs=val_images, curve_labels=curve_labels, curve_every=curve_every,
            desc=f"{arch} end to end")
        record(f"{arch}_end_to_end", stacked.predict(test_images), [])
        val_accuracy[f"{arch}_end_to_end"] = curve[:, -1].tolist()  # the curve's last point, on the sample
        curves[f"{arch}_end_to_end"] = curve
        timings[f"{arch}_end_to_end"] = time.perf_counter() - t

    # Graph-based semi-supervised learning on the unlabelled training codes (inductive).
    t = time.perf_counter()
    set_threads(2)
    weights, nearest = code_graph(codes["train"].numpy(), cfg.neighbours)
    test_neighbours, val_neighbours = nearest(codes["test"].numpy()), nearest(codes["val"].numpy())
    timings["graph"] = time.perf_counter() - t
    t = time.perf_counter()
    for idx, y in tqdm(list(zip(draws, labelled)), desc="poisson learning", leave=False):
        for name, train_pred in poisson_labels(weights, idx, y, cfg.balance).items():
            record(name, [vote(train_pred, test_neighbours)], [vote(train_pred, val_neighbours)])
    timings["poisson"] = time.perf_counter() - t

    # Metrics and figures.
    graph_methods = ("poisson", "poisson_balanced", "poisson_volume")
    methods = {}
    for name, accs in per_draw.items():
        family = ("graph" if name in graph_methods else "baseline" if name in ("logistic_regression", "nearest_labelled")
                  else "mlp")
        methods[name] = {"test_accuracy": summary(accs), "per_draw": [round(a, 4) for a in accs],
                         "val_accuracy": round(float(np.mean(val_accuracy[name])), 4),
                         "val_images": len(curve_rows) if name.endswith("_end_to_end") else len(val_labels),
                         "transductive": False, "uses_unlabelled_codes": family == "graph", "family": family,
                         "draws": len(accs)}
    # The headline is picked on validation, not on the test set it is reported on.
    best = max(methods, key=lambda name: methods[name]["val_accuracy"])
    epochs_axis = sorted(set(range(0, cfg.epochs + 1, cfg.curve_every)) | {cfg.epochs})
    curve_metrics = {"epochs": epochs_axis, "val_images": len(curve_rows),
                     "note": f"validation accuracy on a fixed sample of {len(curve_rows)} validation images, "
                             "mean and standard deviation over draws"}
    for name in ("seed_mlp_frozen", "seed_mlp_end_to_end"):
        curve_metrics[name] = {"mean": [round(float(v), 4) for v in curves[name].mean(0)],
                               "std": [round(float(v), 4) for v in curves[name].std(0)]}
    from latentlab.data import dataset_name

    reference = REFERENCE if dataset_name(ctx.config.data_dir) == "MNIST" else {}  # MNIST's figures, for MNIST only
    figures.fewshot_curves(curve_metrics, reference, ctx.run.figures / "fewshot_curves.png")
    figures.fewshot_methods(methods, reference, best, ctx.run.figures / "fewshot_methods.png")
    timings["total"] = time.perf_counter() - start
    return {"fewshot": {
        "labels": 10 * cfg.labels_per_class, "draws": cfg.draws, "draw": cfg.draw,
        "labels_file": labels_file.name, "train_images": limit, "epochs": cfg.epochs,
        "end_to_end_draws": {"seed_mlp": cfg.draws, "other_architectures": min(cfg.end_to_end_draws or cfg.draws,
                                                                               cfg.draws)},
        "best_method": best,
        "note": ("Every method is inductive: the graph holds only the training codes, and validation and test "
                 "codes are labelled by a vote of their nearest training codes. The headline method is the best "
                 "on the validation split (the end-to-end models on the fixed validation sample of the curves); "
                 "test images are never used to choose anything."),
        "reference": {**reference, "source": "the reference report: validation accuracy, one draw of 50 labels"}
        if reference else None,
        "methods": methods,
        "curves": curve_metrics,
        "graph": {"nodes": limit, "neighbours": cfg.neighbours, "balance": cfg.balance,
                  "metric": "cosine distance after PCA whitening of the codes",
                  "weights": "self-tuned Gaussian x shared-neighbour fraction",
                  "new_codes": f"majority of the {VOTE_NEIGHBOURS} nearest training codes",
                  "test_images_in_graph": False},
        "architectures": {name: [f"{w} {act}" for w, act in layers] + ["10 softmax"]
                          for name, layers in ARCHITECTURES.items()},
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }}
