"""Stage: digit classification from the latent codes with only 50 labelled training images.

Two parts, both on the same label draws (5 per digit by default, several draws with their own seeds):
1. the reference study: MLPs trained on the frozen codes, and the same MLPs stacked on a copy of the
   encoder and fine-tuned end to end (the run's autoencoder is never changed);
2. graph-based semi-supervised learning, which also uses the 55k unlabelled training codes: Poisson
   learning (graphlearning's method and edge weights; every draw in one torch solve) on a kNN graph of the
   partially whitened codes, then a 10-NN vote labels new codes;
   the same again on the codes of deskewed images (`deskew_*`), whose neighbourhoods are cleaner;
3. self-training: a ridge regression on the encoder's pooled conv features of the deskewed training images
   learns the deskewed graph's labels of them, and new images take the mean of its scores and their vote's
   (`deskew_poisson_ridge`); opt-in, a CNN per draw learns the same labels (`deskew_poisson_cnn`).

Labels reach the classifiers through one door: `reveal(train_labels, indices)` is the only read of
training labels after the draw; everything downstream sees codes, images and those 50 labels. The graph
holds training codes only, so every method here is inductive: test images are never in any graph.
"""
import copy
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sparse
from scipy.sparse.csgraph import reverse_cuthill_mckee
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from latentlab import figures
from latentlab.classifier import predict_proba, train_classifier
from latentlab.config import ClassifierConfig, FewshotConfig
from latentlab.context import Context, cpu_budget, set_threads, sub_seed
from latentlab.errors import LatentlabError
from latentlab.models import CONV_FORMAT, adam, batched, inference_batch
from latentlab.runfolder import write_json

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
# The graph's principal directions scaled by variance ** -0.375, between full whitening (0.5) and none: with 10
# balanced draws, the deskewed codes' training labels 97.73 -> 97.99% right, validation 97.54 -> 98.01%; the plain
# codes' balanced decision validation 96.48 -> 96.68% (0.25 loses there: docs/fewshot_sweep.md)
WHITEN_POWER = 0.375
VOTE_NEIGHBOURS = 10   # new codes take the majority label of their nearest training codes
DIGITS = 10            # classes of the task; a random draw of 50 labels can miss one
RIDGE_PENALTY = 1e-3   # the self-training ridge's penalty per training image, on standardised features (3e-3: the same)
POISSON_TOL = 1e-2     # residual at which the Poisson solve stops (graphlearning's default 1e-3 took 4-5 s more
                       # per graph; 10 draws' test accuracy moved by at most 0.006 points)


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
    """One model per label draw, trained together; each draw's copy sees only its own 50 examples and follows
    the same updates it would alone (full batch, Adam: its update is elementwise, so one optimizer over every
    copy updates each as its own would).

    On a GPU the copies' weights are stacked and run through torch.func.vmap, one launch per layer for all
    draws. On the CPU a plain loop over the copies is faster (the end-to-end step of 10 draws x 50 images:
    130 -> 99 ms on one thread), as each encoder keeps its own channels-last convolutions where vmap made one
    grouped convolution of them."""

    def __init__(self, models: list[nn.Module], vmapped: bool | None = None):
        device = next(models[0].parameters()).device
        self.vmapped = device.type != "cpu" if vmapped is None else vmapped
        if self.vmapped:  # stacked, conv weights run as one grouped conv, faster in the default layout
            models = [copy.deepcopy(m).to(memory_format=torch.contiguous_format) for m in models]
            self.base = copy.deepcopy(models[0]).to("meta")
            params, self.buffers = stack_module_state(models)
            self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
            weights = list(self.params.values())
        else:
            self.models = [copy.deepcopy(m).to(memory_format=CONV_FORMAT) for m in models]
            weights = [w for m in self.models for w in m.parameters()]
        self.optimizer = adam(weights, lr=LEARNING_RATE)

    def _logits(self, params, buffers, inputs):
        return functional_call(self.base, (params, buffers), (inputs,))

    def copies(self):
        """Each draw's model as a function of inputs."""
        if not self.vmapped:
            return self.models
        count = len(next(iter(self.params.values())))
        return [lambda x, c=c: self._logits({k: v[c] for k, v in self.params.items()},
                                            {k: v[c] for k, v in self.buffers.items()}, x) for c in range(count)]

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """inputs (draws, 50, ...), labels (draws, 50): one full-batch step of every copy."""
        if self.vmapped:
            logits = vmap(self._logits)(self.params, self.buffers, inputs)
        else:
            logits = torch.stack([model(x) for model, x in zip(self.models, inputs)])
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.shape[1]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Every copy's digit for each of the shared inputs (N, ...) -> (draws, N).

        Copy by copy: with inputs shared by all copies, plain calls run the encoders' convolutions about 1.7x
        faster than vmap's batched form on this CPU (10 fine-tuned encoders over the 10k test images)."""
        batch_size = batch_size or inference_batch(inputs.device)
        digits = [torch.cat([model(inputs[i:i + batch_size]).argmax(1) for i in range(0, len(inputs), batch_size)])
                  for model in self.copies()]
        return torch.stack(digits).cpu().numpy()


def train_mlps(models, inputs, labels, *, epochs: int, curve_inputs, curve_labels, curve_every: int,
               desc: str) -> tuple[np.ndarray, Stacked]:
    """Train the stacked copies; returns the validation-accuracy curve (draws, points) and the trained copies."""
    stacked = Stacked(models)
    curve = []
    for epoch in tqdm(range(epochs + 1), desc=desc, leave=False, mininterval=0.5):
        if epoch == epochs or (curve_every and epoch % curve_every == 0):  # curve_every=0: the last epoch only
            curve.append((stacked.predict(curve_inputs) == curve_labels).mean(axis=1))
        if epoch < epochs:
            stacked.step(inputs, labels)
    return np.stack(curve, axis=1), stacked


# ---- graph-based semi-supervised learning on the unlabelled codes ----------------------------------

def whiten(train_codes: torch.Tensor, power: float = WHITEN_POWER):
    """Partial PCA whitening fitted on the training codes, then unit length: Euclidean distance becomes cosine
    distance in a space where the code's principal directions are scaled by their variance ** -power (0.5 is
    full whitening, where every direction counts the same; 0 only rotates)."""
    x = train_codes.double()
    mean = x.mean(0)
    values, vectors = torch.linalg.eigh(torch.cov(x.T))
    scale = vectors * values.clamp_min(1e-12) ** -power
    return lambda codes: F.normalize(((codes.double() - mean) @ scale).float(), dim=1)


def best_in_tile(similarity: torch.Tensor, k: int, slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k largest values and their columns, as topk gives them, in two cheaper steps.

    The columns are cut into `slices` equal slices laid side by side; the k best values lie in at most k of the
    slices' columns, and those columns have the k largest maxima across the slices. So one elementwise max over
    the slices, a topk over those maxima, and a topk over the k x slices values they point to. torch's topk
    costs about the same per row whatever its length, so this is 25% faster on 512 x 4096 tiles here."""
    rows, columns = similarity.shape
    if columns % slices or columns // slices < k:
        return similarity.topk(min(k, columns), dim=1)
    width = columns // slices
    sliced = similarity.view(rows, slices, width)
    _, column = sliced.amax(1).topk(k, dim=1)                                       # (rows, k) within a slice
    candidates = sliced.gather(2, column[:, None, :].expand(-1, slices, -1)).flatten(1)  # (rows, slices * k)
    top, pick = candidates.topk(k, dim=1)
    return top, (pick // k) * width + column.gather(1, pick % k)


def nearest(queries: torch.Tensor, points: torch.Tensor, k: int, *, exclude_self: bool = False,
            batch_size: int = 512, chunk: int = 4096, slices: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest `points` of each query (unit vectors), brute force on their device:
    (distances (Q, k), indices (Q, k)), nearest first. `exclude_self`: queries are the points themselves.

    Similarities are made in tiles of batch_size x chunk, each tile keeping its own k best (`best_in_tile`): a
    tile stays in the CPU's cache, where one row block against all 55k points (225 MB) did not (14 s -> 8 s
    here); tiles of 512 x 4096 (8 MB) pick their k best 23% faster than 512 x 8192.
    """
    distances, indices = [], []
    for start in range(0, len(queries), batch_size):
        block = queries[start:start + batch_size]
        best, where = [], []
        for first in range(0, len(points), chunk):
            similarity = block @ points[first:first + chunk].T                          # (b, c)
            if exclude_self and first < start + len(block) and start < first + similarity.shape[1]:
                # this tile holds some queries' own columns: query start + i is point first + j
                own = (torch.arange(len(block), device=points.device)[:, None] + start
                       == torch.arange(similarity.shape[1], device=points.device)[None, :] + first)
                similarity.masked_fill_(own, -float("inf"))
            top, index = best_in_tile(similarity, k, slices)
            best.append(top)
            where.append(index + first)
        top, pick = torch.cat(best, 1).topk(k, dim=1)
        distances.append((2 - 2 * top).clamp_min(0).sqrt())                            # |a - b| of unit vectors
        indices.append(torch.cat(where, 1).gather(1, pick))
    return torch.cat(distances), torch.cat(indices)


def code_graph(train_codes: torch.Tensor, neighbours: int):
    """A kNN graph of the training codes, built once for all draws.

    Distances are cosine distances after partial PCA whitening (`whiten`): it evens out the code's directions,
    which here cleans the neighbourhoods (full-label 10-NN accuracy 97.5% -> 97.9% with full whitening). Edge
    weights are graphlearning's self-tuned Gaussian, times the fraction of shared neighbours, which thins the
    few edges that bridge two digits. The neighbour search runs in torch on the codes' device.
    Returns the weight matrix (scipy sparse) and a function giving each new code's nearest training codes.
    """
    import graphlearning as gl

    embed = whiten(train_codes)
    points = embed(train_codes)
    dist, ind = (t.cpu().numpy() for t in nearest(points, points, neighbours, exclude_self=True))
    n = len(points)
    ind = np.hstack([np.arange(n)[:, None], ind])  # graphlearning counts each point as its own first neighbour
    dist = np.hstack([np.zeros((n, 1), dtype=dist.dtype), dist]).astype(np.float64)
    weights = gl.weightmatrix.knn(None, neighbours, knn_data=(ind, dist))
    member = sparse.csr_matrix((np.ones(ind.size), ind.ravel(), np.arange(0, ind.size + 1, neighbours + 1)),
                               shape=(n, n))
    shared = (member @ member.T).multiply(weights > 0)  # neighbours two linked codes have in common
    weights = weights.multiply(shared).tocsr() / (neighbours + 1)
    return weights, lambda codes: nearest(embed(codes), points, VOTE_NEIGHBOURS)[1]


def poisson_solve(weights, sources: torch.Tensor, groups: torch.Tensor, *, tol: float = POISSON_TOL,
                  max_iter: int = 10_000) -> torch.Tensor:
    """Poisson learning's linear solve for many right-hand sides at once (all draws, all classes).

    graphlearning's `ssl.poisson` (conjugate gradient, its default) solves L x = D^-1/2 b with the normalised
    Laplacian L = I - D^-1/2 W D^-1/2 (W without its diagonal) and returns u = D^-1/2 x, one draw at a time.
    The problem is linear in b, so the columns of every draw go through one sparse product per iteration.
    Iterations go on until each draw's residual norm (its columns together: `groups` gives each column's
    draw) is below `tol`, graphlearning's stopping rule for one draw.
    In float32: at this tolerance it labels as float64 does (10 draws of the 55k codes: 99.999% of argmaxes
    equal to graphlearning's), and on the CPU its sparse products are 3x faster (the whole solve 6 s, against
    38 s in float64 and 16 s for graphlearning's fits one draw at a time; 5.3 s on one thread since the codes are
    renumbered below).
    sources (n, columns) on the device where the solve runs; returns u (n, columns), float64.
    """
    w = sparse.csr_matrix(weights)
    w.setdiag(0)
    w.eliminate_zeros()
    degree = np.asarray(w.sum(axis=1)).ravel()
    d = 1 / np.sqrt(degree)
    normalised = (sparse.diags(d) @ w @ sparse.diags(d)).tocsr()   # D^-1/2 W D^-1/2; L x = x - normalised @ x
    # The codes renumbered in reverse Cuthill-McKee order: linked codes get nearby numbers, so the rows of p that
    # one sparse product reads lie close in memory (55k codes, 100 columns, one CPU thread: 47 -> 20 ms a product)
    order = reverse_cuthill_mckee(normalised, symmetric_mode=True)
    normalised, d = normalised[order][:, order], d[order]
    device = sources.device
    order = torch.from_numpy(order.astype(np.int64)).to(device)   # the same renumbering, for the device's tensors
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long stable
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(
            *(torch.from_numpy(a) for a in (normalised.indptr.astype(np.int64), normalised.indices.astype(np.int64),
                                            normalised.data)),
            size=normalised.shape, dtype=torch.float32, check_invariants=False).to(device)
    d = torch.from_numpy(d).float().to(device)[:, None]
    b = sources[order].float() * d
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs_old = torch.linalg.vecdot(r, r, dim=0)
    for _ in range(max_iter):  # conjugate gradient, column by column; updates in place (7-15% faster on the CPU)
        ap = matrix @ p
        ap = torch.sub(p, ap, out=ap)   # L p, in the product's own memory (a fresh 22 MB a step cost 3 ms more)
        alpha = rs_old / torch.linalg.vecdot(p, ap, dim=0).clamp_min(1e-30)
        x.addcmul_(p, alpha)
        r.addcmul_(ap, alpha, value=-1)
        rs_new = torch.linalg.vecdot(r, r, dim=0)
        per_draw = torch.zeros(int(groups.max()) + 1, dtype=rs_new.dtype, device=device).index_add_(0, groups, rs_new)
        if per_draw.sqrt().max() <= tol:  # one sync per iteration: a few hundred in all
            break
        p.mul_(rs_new / rs_old.clamp_min(1e-30)).add_(r)
        rs_old = rs_new
    return torch.empty_like(x).index_copy_(0, order, x * d).double()   # back in the codes' own order


def balance_weights(scores: np.ndarray, priors: np.ndarray, *, tol: float = 1e-3, max_steps: int = 1000):
    """Class weights w such that argmax(scores * w) labels each class's share `priors` of the codes.

    This is graphlearning's volume label projection (`ssl.volume_label_projection`, what its Poisson
    learning does with `class_priors`), written over a precomputed score matrix because the library's
    version recomputes scores each step and costs seconds per draw here. Balanced draws converge in a
    few hundred steps; the cap bounds the time when a random draw's label frequencies cannot be met.

    Each step needs the class sizes under the new weights. In log space a code's label changes only once the
    weights have moved, relative to each other, by more than the gap between its two best classes; so the codes
    are kept sorted by that gap, each step relabels only the prefix whose gap the weights' drift reaches (about
    a tenth of them), and the rest keep their labels' counts. The weights are bit-identical to relabelling
    every code every step, in a quarter of the time.
    """
    n, classes = scores.shape
    with np.errstate(divide="ignore"):
        logs = np.log(scores)

    def sort_by_gap(w):  # the codes by the gap between their two best classes at w; label counts from i onwards
        top2 = np.partition(logs + np.log(w), -2, axis=1)[:, -2:]
        with np.errstate(invalid="ignore"):  # a row of zeros: -inf - -inf, a tie
            gaps = np.nan_to_num(top2[:, 1] - top2[:, 0], nan=0.0)
        order = np.argsort(gaps)
        rows = scores[order]
        onehot = np.eye(classes)[np.argmax(rows * w, axis=1)]
        counts_from = np.vstack([np.cumsum(onehot[::-1], axis=0)[::-1], np.zeros(classes)])
        return rows, gaps[order], counts_from, np.log(w)

    w = np.ones(len(priors))
    rows, gaps, counts_from, anchor = sort_by_gap(w)
    for _ in range(max_steps):
        shift = np.log(w) - anchor
        k = np.searchsorted(gaps, shift.max() - shift.min() + 1e-9, side="right")  # 1e-9: rounding of the logs
        if k > n // 4:
            rows, gaps, counts_from, anchor = sort_by_gap(w)
            k = np.searchsorted(gaps, 1e-9, side="right")
        relabelled = np.bincount(np.argmax(rows[:k] * w, axis=1), minlength=classes)
        sizes = (counts_from[k] + relabelled) / n
        if np.abs(sizes - priors).max() <= tol:
            break
        w = w - 0.1 * (sizes - priors)
        w = w / w[0]
    return w


def poisson_sources(n: int, draws: list[np.ndarray], columns) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisson learning's source term of every draw side by side, (n, columns), and each column's draw.

    graphlearning's source puts onehot - mean(onehot) at each label, so a class with more labels pushes harder.
    Here each label is weighted by (labels / classes) / its class's labels: every class's labels carry the same
    total, and on a balanced draw the source is graphlearning's exactly. On random draws (2 to 9 labels of a
    digit) this lifts the deskewed graph's `poisson_uniform` from 97.41% to 97.95% and its worst draw from 96.50%
    to 97.09% (10 draws; docs/fewshot_sweep.md).
    `columns`: per draw, (its classes, each label's index among them), as np.unique(..., return_inverse) gives.
    """
    sources = []
    for indices, (classes, local) in zip(draws, columns):
        onehot = np.eye(len(classes))[local]
        weight = (len(local) / len(classes)) / np.bincount(local)[local]   # 1 for every label of a balanced draw
        source = np.zeros((n, len(classes)))
        source[indices] = (onehot - 1 / len(classes)) * weight[:, None]
        sources.append(source)
    groups = np.concatenate([np.full(len(classes), i) for i, (classes, _) in enumerate(columns)])
    return torch.from_numpy(np.hstack(sources)), torch.from_numpy(groups)


def poisson_labels(weights, draws: list[np.ndarray], labelled: list[np.ndarray], balance: float,
                   device, workers: int = 1) -> list[dict[str, np.ndarray]]:
    """Labels of every training code by Poisson learning for every draw (one stacked solve), with four
    decisions: `poisson` (argmax), `poisson_volume` (class sizes forced to the label frequencies, graphlearning's
    class_priors), `poisson_balanced` (the geometric middle, weights ** balance: sizes pulled
    towards the priors without forcing them; digits are not exactly equally frequent) and `poisson_uniform`
    (the same pull towards equal class sizes). A random draw with no label of one digit: in `poisson_uniform`
    that digit is a class too, with the score Poisson learning gives a class without labels (u = 0 everywhere),
    balanced fully to its tenth of the codes, as nothing but its share speaks for it.
    The draws' decisions are made by `workers` threads (numpy's sorts and argmaxes release the GIL)."""
    columns = [np.unique(labels, return_inverse=True) for labels in labelled]  # a random draw can miss a digit
    sources, groups = poisson_sources(weights.shape[0], draws, columns)
    u = poisson_solve(weights, sources.to(device), groups.to(device)).cpu().numpy()
    starts = np.cumsum([0] + [len(classes) for classes, _ in columns])
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda i: decisions(u[:, starts[i]:starts[i + 1]], *columns[i], balance),
                             range(len(columns))))


def decisions(block: np.ndarray, classes: np.ndarray, local: np.ndarray, balance: float) -> dict[str, np.ndarray]:
    """One draw's four decisions from its Poisson scores `block` (n, its classes); see poisson_labels."""
    scores = (block - block.min()) / (block.max() - block.min())  # graphlearning's normalisation
    priors = np.bincount(local) / len(local)
    w = balance_weights(scores, priors)
    missing = np.setdiff1d(np.arange(DIGITS), classes)
    if len(missing) == 1:  # the codes no label reaches are that digit (two or more missing could not be named)
        unlabelled = (0 - block.min()) / (block.max() - block.min())   # u = 0, normalised as the other scores
        every = np.hstack([scores, np.full((len(scores), 1), unlabelled)])
        digits = np.append(classes, missing)
        uniform_labels = digits[np.argmax(every * balance_weights(every, np.full(DIGITS, 1 / DIGITS)), axis=1)]
    else:  # the same pull towards equal class sizes: the digits are about equally frequent, whereas a random
        # draw's label frequencies are a noisy guess (on balanced draws the two are the same)
        equal = np.full(len(classes), 1 / len(classes))
        uniform = w if np.array_equal(priors, equal) else balance_weights(scores, equal)
        uniform_labels = classes[np.argmax(scores * uniform ** balance, axis=1)]
    return {"poisson": classes[np.argmax(scores, axis=1)],
            "poisson_balanced": classes[np.argmax(scores * w ** balance, axis=1)],
            "poisson_uniform": uniform_labels,
            "poisson_volume": classes[np.argmax(scores * w, axis=1)]}


def deskew(images: torch.Tensor) -> torch.Tensor:
    """Each image sheared so that its slant is gone and shifted so that its centre of mass is the centre.

    The classic MNIST normalisation (moments of the ink: the shear is cov(x, y) / var(y)), one image at a time
    and without labels, so new images get it the same way. The encoder's codes of deskewed images put far
    fewer digits among another digit's neighbours: with all training labels, the 10-NN vote on validation
    codes goes from 97.8% to 98.7% (docs/fewshot_sweep.md).
    """
    n, size = len(images), images.shape[-1]
    grid = torch.arange(size, dtype=images.dtype, device=images.device)
    mass = images.sum((1, 2, 3)).clamp_min(1e-6)
    rows, cols = images.sum((1, 3)), images.sum((1, 2))                                  # (n, size) each
    cy, cx = (rows * grid).sum(1) / mass, (cols * grid).sum(1) / mass
    dy, dx = grid[None, :] - cy[:, None], grid[None, :] - cx[:, None]
    var_y = (rows * dy ** 2).sum(1) / mass
    cov_xy = (images[:, 0] * dy[:, :, None] * dx[:, None, :]).sum((1, 2)) / mass
    centre = (size - 1) / 2
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    # output (u, v) in [-1, 1] reads the input at (u + shear * v + x-offset, v + y-offset)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = 1, cov_xy / var_y.clamp_min(1e-6), (cx - centre) / centre
    theta[:, 1, 1], theta[:, 1, 2] = 1, (cy - centre) / centre
    return F.grid_sample(images, F.affine_grid(theta, images.shape, align_corners=True), align_corners=True)


def vote_shares(train_predictions: np.ndarray, neighbours: torch.Tensor) -> torch.Tensor:
    """(Q, 10): the share of each label among each new code's nearest training codes."""
    votes = torch.from_numpy(train_predictions).to(neighbours.device)[neighbours]        # (Q, k)
    return F.one_hot(votes, DIGITS).sum(1) / neighbours.shape[1]


def vote(train_predictions: np.ndarray, neighbours: torch.Tensor) -> np.ndarray:
    """Each new code's label: the majority label among its nearest training codes (ties: the smallest digit)."""
    return vote_shares(train_predictions, neighbours).argmax(1).cpu().numpy()


# ---- the stage, in named steps --------------------------------------------------------------------

def summary(per_draw: list[float]) -> dict:
    a = np.asarray(per_draw, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min())}


class Scores:
    """Per method: test accuracy of each draw, and validation accuracy (what picks the headline)."""

    def __init__(self, test_labels: np.ndarray, val_labels: np.ndarray):
        self.test_labels, self.val_labels = test_labels, val_labels
        self.test: dict[str, list[float]] = {}
        self.val: dict[str, list[float]] = {}

    def add(self, name: str, test_predictions, val_predictions) -> None:
        self.test.setdefault(name, []).extend(float((p == self.test_labels).mean()) for p in test_predictions)
        self.val.setdefault(name, []).extend(float((p == self.val_labels).mean()) for p in val_predictions)


def label_baselines(codes: dict, draws, labelled, scores: Scores) -> None:
    """Logistic regression and the nearest labelled code, on the 50 labelled codes alone (scikit-learn)."""
    test, val = codes["test"].cpu().numpy(), codes["val"].cpu().numpy()
    for idx, y in zip(draws, labelled):
        x = codes["train"][idx].cpu().numpy()
        for name, model in (("logistic_regression", LogisticRegression(max_iter=2000)),
                            ("nearest_labelled", KNeighborsClassifier(1))):
            model.fit(x, y)
            scores.add(name, [model.predict(test)], [model.predict(val)])


def reference_mlps(ctx: Context, cfg: FewshotConfig, codes: dict, train_images, draws, labelled, curve_rows,
                   scores: Scores, timings: dict) -> dict:
    """The reference study: every architecture on frozen codes and end to end, all draws at once.

    Curves per epoch for the reference MLP; the end-to-end regime of the other architectures runs on
    `end_to_end_draws` draws, as each draw fine-tunes its own encoder (the costly part of the stage).
    Returns the curves (draws, points) by method.
    """
    device, seed = ctx.device, ctx.config.seed
    label_tensor = torch.as_tensor(np.stack(labelled)).to(device)
    curve_labels = scores.val_labels[curve_rows]
    curve_index = torch.as_tensor(curve_rows).to(device)
    val_images, test_images = ctx.images("val")[curve_index], ctx.images("test")
    latent_dim = codes["train"].shape[1]
    curves = {}
    for arch, layers in ARCHITECTURES.items():
        curve_every = cfg.curve_every if arch == "seed_mlp" else 0
        t = time.perf_counter()
        torch.manual_seed(sub_seed(seed, f"fewshot-frozen-{arch}"))
        heads = [make_head(layers, latent_dim).to(device) for _ in draws]
        curve, stacked = train_mlps(
            heads, torch.stack([codes["train"][idx] for idx in draws]), label_tensor, epochs=cfg.epochs,
            curve_inputs=codes["val"][curve_index], curve_labels=curve_labels, curve_every=curve_every,
            desc=f"{arch} frozen")
        scores.add(f"{arch}_frozen", stacked.predict(codes["test"]), stacked.predict(codes["val"]))
        curves[f"{arch}_frozen"] = curve
        timings[f"{arch}_frozen"] = time.perf_counter() - t

        t = time.perf_counter()
        e2e_draws = draws if arch == "seed_mlp" else draws[:cfg.end_to_end_draws or len(draws)]
        torch.manual_seed(sub_seed(seed, f"fewshot-end-to-end-{arch}"))
        models = [nn.Sequential(copy.deepcopy(ctx.autoencoder.encoder).requires_grad_(True),
                                make_head(layers, latent_dim).to(device)) for _ in e2e_draws]
        curve, stacked = train_mlps(
            models, torch.stack([train_images[idx] for idx in e2e_draws]), label_tensor[:len(e2e_draws)],
            epochs=cfg.epochs, curve_inputs=val_images, curve_labels=curve_labels, curve_every=curve_every,
            desc=f"{arch} end to end")
        scores.add(f"{arch}_end_to_end", stacked.predict(test_images), [])
        scores.val[f"{arch}_end_to_end"] = curve[:, -1].tolist()  # the curve's last point, on the sample
        curves[f"{arch}_end_to_end"] = curve
        timings[f"{arch}_end_to_end"] = time.perf_counter() - t
    return curves


def graph_methods(ctx: Context, cfg: FewshotConfig, codes: dict, draws, labelled, scores: Scores,
                  timings: dict, prefix: str = "") -> tuple[list[dict[str, np.ndarray]], dict[str, torch.Tensor]]:
    """Poisson learning on a kNN graph of the unlabelled training codes (inductive: new codes vote).
    Returns each draw's labels of the training codes by each decision, and the nearest training codes of
    each test and validation code (the voters)."""
    t = time.perf_counter()
    weights, nearest_train = code_graph(codes["train"], cfg.neighbours)
    test_neighbours, val_neighbours = nearest_train(codes["test"]), nearest_train(codes["val"])
    timings[f"{prefix}graph"] = time.perf_counter() - t
    t = time.perf_counter()
    # the decisions in threads: all the cores beside a GPU, else the stage's own share of them
    workers = cpu_budget() if ctx.device.type == "cuda" else ctx.threads
    train_labels = poisson_labels(weights, draws, labelled, cfg.balance, ctx.device, workers)
    for train_predictions in train_labels:
        for name, predictions in train_predictions.items():
            scores.add(prefix + name, [vote(predictions, test_neighbours)], [vote(predictions, val_neighbours)])
    timings[f"{prefix}poisson"] = time.perf_counter() - t
    return train_labels, {"test": test_neighbours, "val": val_neighbours}


def deskewed_codes(ctx: Context, train_images: torch.Tensor) -> tuple[dict, dict]:
    """The frozen encoder's codes of the deskewed images of each split, and its pooled conv features of them
    (`Encoder.with_features`), on the device (deskewed batch by batch; one pass for both)."""
    encoder = ctx.autoencoder.encoder
    images = {"train": train_images, "val": ctx.images("val"), "test": ctx.images("test")}
    both = {part: batched(lambda x: encoder.with_features(deskew(x)), x, ctx.device) for part, x in images.items()}
    dim = encoder.latent_dim
    return {part: x[:, :dim] for part, x in both.items()}, {part: x[:, dim:] for part, x in both.items()}


def best_decision(graph_labels: list[dict], scores: Scores) -> str:
    """The deskewed graph's decision best on validation: the labels self-training learns."""
    return max(graph_labels[0], key=lambda name: np.mean(scores.val["deskew_" + name]))


def standardised(features: dict) -> dict[str, np.ndarray]:
    """Each split's features standardised with the training split's statistics, in place (they are the step's
    own: no second 300 MB copy), as numpy arrays for scikit-learn (its StandardScaler took 3 of the ridge's 5 s)."""
    mean, std = features["train"].mean(0), features["train"].std(0).clamp_min(1e-6)
    return {part: x.sub_(mean).div_(std).cpu().numpy() for part, x in features.items()}


def self_trained_ridge(features: dict[str, np.ndarray], graph_labels: list[dict], voters: dict, scores: Scores) -> str:
    """Self-training, linear (deskew_poisson_ridge): a ridge regression (scikit-learn) learns the deskewed graph's
    one-hot labels of the training images from the encoder's pooled conv features of them (`standardised`); every
    draw's labels are columns of one solve. A new image's class scores are the mean of the ridge's and
    of its vote's label shares: the ridge, smoother than the vote, carries over to new writers (test images), and
    the vote keeps the near twins that a training writer leaves (validation images come from the training set's
    writers). The ridge alone scored 98.1% on test and 97.5% on validation, the vote 98.3% and 98.0%, their mean
    98.5% and 98.2% (docs/fewshot_sweep.md). Returns the decision whose labels it learnt."""
    decision = best_decision(graph_labels, scores)
    targets = np.concatenate([np.eye(DIGITS, dtype=np.float32)[draw[decision]] for draw in graph_labels], axis=1)
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):  # the stage's share of the cores
        # copy_X=False: the ridge centres the training features in place instead of in a copy (240 MB)
        ridge = Ridge(alpha=RIDGE_PENALTY * len(targets), copy_X=False).fit(features["train"], targets)
        ridge_scores = {part: torch.from_numpy(ridge.predict(features[part])).view(-1, len(graph_labels), DIGITS)
                        for part in ("test", "val")}
    predictions = {}
    for part in ("test", "val"):
        predictions[part] = [((ridge_scores[part][:, i] + vote_shares(draw[decision], voters[part]).cpu()) / 2)
                             .argmax(1).numpy() for i, draw in enumerate(graph_labels)]
    scores.add("deskew_poisson_ridge", predictions["test"], predictions["val"])
    return decision


def self_trained_cnn(ctx: Context, cfg: FewshotConfig, train_images: torch.Tensor, graph_labels: list[dict],
                     scores: Scores, timings: dict) -> None:
    """Self-training: per draw, a CNN (the judge's architecture) learns the deskewed graph's labels of the deskewed
    training images, then labels new deskewed images on its own: no graph, no vote (deskew_poisson_cnn).

    The labels come from the deskewed graph decision best on validation. The CNN's pixels and convolutions
    undo part of the graph's mistakes: on two draws 98.0 -> 98.4% and 98.3 -> 98.6% (docs/fewshot_sweep.md).
    """
    t = time.perf_counter()
    decision = best_decision(graph_labels, scores)
    train, val, test = (batched(deskew, x, ctx.device) for x in (train_images, ctx.images("val"), ctx.images("test")))
    test_digits, val_digits = [], []
    for i, labels in enumerate(draw[decision] for draw in graph_labels):
        model, _ = train_classifier(ClassifierConfig(epochs=cfg.self_train_epochs), train, labels, val,
                                    scores.val_labels, seed=sub_seed(ctx.config.seed, f"fewshot-cnn-{i}"),
                                    device=ctx.device)
        test_digits.append(predict_proba(model, test).argmax(1))
        val_digits.append(predict_proba(model, val).argmax(1))
    scores.add("deskew_poisson_cnn", test_digits, val_digits)
    timings["deskew_poisson_cnn"] = time.perf_counter() - t


GRAPH_METHODS = tuple(prefix + name for prefix in ("", "deskew_")
                      for name in ("poisson", "poisson_balanced", "poisson_uniform", "poisson_volume"))
# The ablation: each ingredient added in turn, with the method that has it and the timings it costs.
ABLATION = (("the labelled codes alone (logistic regression)", "logistic_regression", ("baselines",)),
            ("+ the unlabelled training codes: Poisson learning on their graph, new codes vote", "poisson",
             ("graph", "poisson")),
            ("+ class balancing of the Poisson scores", "poisson_balanced", ()),
            ("+ deskewed images: the graph and the vote on their codes (plain Poisson)", "deskew_poisson",
             ("deskew_codes", "deskew_graph", "deskew_poisson")),
            ("+ class balancing, on the deskewed codes", "deskew_poisson_balanced", ()),
            ("+ self-training, linear: a ridge regression on the encoder's features of the deskewed images learns the "
             "graph's labels of them; new images take the mean of its scores and their vote's", "deskew_poisson_ridge",
             ("deskew_codes", "deskew_graph", "deskew_poisson", "deskew_poisson_ridge")),
            ("+ self-training: a CNN on the deskewed images learns the graph's labels of them", "deskew_poisson_cnn",
             ("deskew_codes", "deskew_graph", "deskew_poisson", "deskew_poisson_cnn")))
BASELINES = ("logistic_regression", "nearest_labelled")
SELF_TRAINING = ("deskew_poisson_ridge", "deskew_poisson_cnn")


def deskewed_methods(ctx: Context, cfg: FewshotConfig, train_images: torch.Tensor, draws, labelled, scores: Scores,
                     timings: dict) -> dict:
    """The graph methods again on the codes of deskewed images, then self-training on that graph's labels: the
    ridge, and the CNN where cfg.self_train_epochs asks for it. Returns the `self_training` section."""
    t = time.perf_counter()
    straight, features = deskewed_codes(ctx, train_images)
    timings["deskew_codes"] = time.perf_counter() - t
    graph_labels, voters = graph_methods(ctx, cfg, straight, draws, labelled, scores, timings, prefix="deskew_")
    t = time.perf_counter()
    width, features = features["train"].shape[1], standardised(features)
    decision = self_trained_ridge(features, graph_labels, voters, scores)
    timings["deskew_poisson_ridge"] = time.perf_counter() - t
    del features  # 300 MB, before the CNN's training
    if cfg.self_train_epochs:
        self_trained_cnn(ctx, cfg, train_images, graph_labels, scores, timings)
    return {"labels": "deskew_" + decision, "ridge_penalty_per_image": RIDGE_PENALTY,
            "ridge_features": f"the encoder's conv activations of the deskewed images, average-pooled to 4 x 4 and "
                              f"3 x 3 cells ({width} values), standardised"}


def method_table(scores: Scores, curve_images: int) -> dict:
    methods = {}
    for name, accs in scores.test.items():
        family = ("graph" if name in GRAPH_METHODS else "baseline" if name in BASELINES
                  else "self-training" if name in SELF_TRAINING else "mlp")
        methods[name] = {"test_accuracy": summary(accs), "per_draw": [round(a, 4) for a in accs],
                         "val_accuracy": round(float(np.mean(scores.val[name])), 4),
                         "val_images": curve_images if name.endswith("_end_to_end") else len(scores.val_labels),
                         "transductive": False, "uses_unlabelled_codes": family in ("graph", "self-training"),
                         "family": family,
                         "draws": len(accs)}
    return methods


def stage(ctx: Context) -> dict:
    cfg: FewshotConfig = ctx.config.fewshot
    seed = ctx.config.seed
    timings = {}
    start = time.perf_counter()

    set_threads(ctx.threads)
    codes = {part: ctx.codes(part) for part in ("train", "val", "test")}
    limit = cfg.train_limit or len(codes["train"])
    train_images, codes["train"] = ctx.images("train")[:limit], codes["train"][:limit]
    val_labels, test_labels = ctx.labels("val"), ctx.labels("test")

    # The draws; after this block no training label other than the drawn ones is read.
    train_labels = ctx.labels("train")[:limit]
    draws = [draw_labels(train_labels, per_class=cfg.labels_per_class, draw=cfg.draw,
                         seed=sub_seed(seed, f"fewshot-draw-{i}")) for i in range(cfg.draws)]
    labelled = [reveal(train_labels, idx) for idx in draws]
    del train_labels
    labels_file = ctx.run.root / "fewshot_labels.json"
    write_json(labels_file, {"draw": cfg.draw, "train_limit": limit,
                             "indices_into": "the run's 55k training split (split.npz['train'])",
                             "draws": [{"indices": idx.tolist(), "labels": y.tolist()}
                                       for idx, y in zip(draws, labelled)]})
    timings["codes_and_draws"] = time.perf_counter() - start

    # A fixed sample of validation images for the per-epoch curves (and the end-to-end models' validation
    # accuracy); every other method is scored on the whole validation split. The headline method is the
    # best on validation, so the test set chooses nothing.
    curve_rows = np.random.default_rng(sub_seed(seed, "fewshot-curve-images")).choice(
        len(val_labels), min(cfg.curve_images, len(val_labels)), replace=False)
    scores = Scores(test_labels, val_labels)

    t = time.perf_counter()
    label_baselines(codes, draws, labelled, scores)
    timings["baselines"] = time.perf_counter() - t
    curves = reference_mlps(ctx, cfg, codes, train_images, draws, labelled, curve_rows, scores, timings)
    graph_methods(ctx, cfg, codes, draws, labelled, scores, timings)
    self_training = deskewed_methods(ctx, cfg, train_images, draws, labelled, scores, timings) if cfg.deskew else None

    # Metrics and figures; the headline is picked on validation, not on the test set it is reported on.
    methods = method_table(scores, len(curve_rows))
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
                 "codes are labelled by a vote of their nearest training codes (deskew_poisson_ridge: by the mean "
                 "of that vote and a ridge regression fitted on the training images alone; deskew_poisson_cnn: by a "
                 "CNN trained on the training images alone). The headline method is the best "
                 "on the validation split (the end-to-end models on the fixed validation sample of the curves); "
                 "test images are never used to choose anything."),
        "reference": {**reference, "source": "the reference report: validation accuracy, one draw of 50 labels"}
        if reference else None,
        "methods": methods,
        "curves": curve_metrics,
        "ablation": [{"step": step, "method": name, "seconds": round(sum(timings.get(k, 0) for k in keys), 2)}
                     for step, name, keys in ABLATION if name in methods],
        "graph": {"nodes": limit, "neighbours": cfg.neighbours, "balance": cfg.balance,
                  "metric": "cosine distance after partial PCA whitening of the codes "
                            f"(variances ** -{WHITEN_POWER:g})",
                  "weights": "self-tuned Gaussian x shared-neighbour fraction",
                  "solver": "conjugate gradient on the normalised Laplacian, every draw's classes in one solve",
                  "sources": "every class's labels carry the same total (graphlearning's source on a balanced draw)",
                  "new_codes": f"majority of the {VOTE_NEIGHBOURS} nearest training codes",
                  "deskew": "deskew_* methods: the same graph and vote on the codes of deskewed images "
                            "(moment-based shear and centring, per image, no labels)" if cfg.deskew else None,
                  "test_images_in_graph": False},
        "self_training": self_training,
        "architectures": {name: [f"{w} {act}" for w, act in layers] + ["10 softmax"]
                          for name, layers in ARCHITECTURES.items()},
        "device": str(ctx.device),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }}
