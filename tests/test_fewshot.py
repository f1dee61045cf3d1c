import copy
import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentlab import fewshot
from latentlab.cli import build_parser, resolve_config
from latentlab.config import validate
from latentlab.context import Context
from latentlab.errors import LatentlabError
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run
from tests.conftest import tiny_config


def fewshot_config(**changes):
    """Two draws, a few epochs, a graph of 3,000 training codes: the whole stage in a few seconds."""
    config = tiny_config()
    cfg = config.fewshot
    cfg.draws, cfg.epochs, cfg.curve_every, cfg.curve_images, cfg.train_limit = 2, 4, 2, 200, 3000
    cfg.self_train_epochs = 1  # the self-trained CNN too, so that the no-leak test covers it
    for key, value in changes.items():
        setattr(cfg, key, value)
    return config


def copy_run(tiny_run, tmp_path, name: str) -> Run:
    return Run(shutil.copytree(tiny_run.root, tmp_path / name, ignore=shutil.ignore_patterns(".lock")))


def run_stage(run: Run, config) -> dict:
    pipeline = Pipeline(run, config)
    pipeline.write_config()
    return pipeline.run_stage("fewshot")["fewshot"]


@pytest.fixture(scope="module")
def first(tiny_run, tmp_path_factory):
    run = copy_run(tiny_run, tmp_path_factory.mktemp("fewshot"), "first")
    return run, run_stage(run, fewshot_config())


LABELS = np.repeat(np.arange(10), 40)[np.random.default_rng(0).permutation(400)]


def test_balanced_draw_is_five_per_digit_and_seeded():
    idx = fewshot.draw_labels(LABELS, per_class=5, draw="balanced", seed=7)
    assert len(set(idx.tolist())) == 50
    assert np.bincount(LABELS[idx], minlength=10).tolist() == [5] * 10
    assert np.array_equal(idx, fewshot.draw_labels(LABELS, per_class=5, draw="balanced", seed=7))
    assert not np.array_equal(idx, fewshot.draw_labels(LABELS, per_class=5, draw="balanced", seed=8))


def test_random_draw_is_fifty_distinct_images():
    idx = fewshot.draw_labels(LABELS, per_class=5, draw="random", seed=3)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50 and idx.max() < len(LABELS)
    assert np.array_equal(idx, fewshot.draw_labels(LABELS, per_class=5, draw="random", seed=3))


def test_draw_refuses_too_few_images_of_a_digit():
    with pytest.raises(LatentlabError, match="labels_per_class=50"):
        fewshot.draw_labels(LABELS, per_class=50, draw="balanced", seed=0)


def test_balance_weights_reach_the_priors():
    scores = np.random.default_rng(0).random((2000, 3)) * [1.0, 0.6, 0.3]  # class 0 would win most codes
    w = fewshot.balance_weights(scores, np.array([0.5, 0.3, 0.2]))
    sizes = np.bincount(np.argmax(scores * w, axis=1), minlength=3) / 2000
    assert np.abs(sizes - [0.5, 0.3, 0.2]).max() <= 2e-3


def _balance_every_code_every_step(scores, priors, *, tol=1e-3, max_steps=1000):
    """The plain form of fewshot.balance_weights: every code relabelled at every step."""
    w = np.ones(len(priors))
    for _ in range(max_steps):
        sizes = np.bincount(np.argmax(scores * w, axis=1), minlength=len(priors)) / len(scores)
        if np.abs(sizes - priors).max() <= tol:
            break
        w = w - 0.1 * (sizes - priors)
        w = w / w[0]
    return w


@settings(max_examples=60, deadline=None)
@given(n=st.integers(5, 400), classes=st.integers(2, 10), seed=st.integers(0, 10_000),
       zero_rows=st.integers(0, 5), tied=st.booleans(), steps=st.sampled_from([1, 7, 300]))
def test_balance_weights_relabel_only_near_ties_yet_match_relabelling_all(n, classes, seed, zero_rows, tied, steps):
    """Relabelling only the codes whose two best classes are closer than the weights' drift gives the very weights
    of relabelling every code every step: rows of zeros, exact ties, unreachable priors included."""
    rng = np.random.default_rng(seed)
    scores = rng.random((n, classes)) * rng.random(classes)      # some classes win far more codes than others
    scores[:min(zero_rows, n)] = 0.0
    if tied:
        scores[:, -1] = scores[:, 0]                              # two classes tie on every code
    priors = rng.dirichlet(np.ones(classes))
    expected = _balance_every_code_every_step(scores, priors, max_steps=steps)
    assert np.array_equal(fewshot.balance_weights(scores, priors, max_steps=steps), expected)


def _moments(images):
    """Centre of mass (y, x) and the covariance of x and y of the ink of each image."""
    import torch

    grid = torch.arange(images.shape[-1], dtype=images.dtype)
    mass = images.sum((1, 2, 3))
    cy = (images.sum((1, 3)) * grid).sum(1) / mass
    cx = (images.sum((1, 2)) * grid).sum(1) / mass
    dy, dx = grid[None, :, None] - cy[:, None, None], grid[None, None, :] - cx[:, None, None]
    return cy, cx, (images[:, 0] * dy * dx).sum((1, 2)) / mass


def test_whitening_scales_each_principal_direction_by_its_variance_to_the_power():
    # variances 100 and 1 along the axes: a point (10, 1) keeps the ratio 10 ** (1 - 2 * power) of its coordinates
    codes = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([10.0, 1.0])
    for power in (0.5, fewshot.WHITEN_POWER, 0.0):
        embedded = fewshot.whiten(codes, power)(torch.tensor([[10.0, 1.0]]))[0].abs()
        assert embedded.norm() == pytest.approx(1.0)
        assert embedded.max() / embedded.min() == pytest.approx(10 ** (1 - 2 * power), rel=0.03)


def test_encoder_features_begin_with_the_code_then_pool_each_conv_layer():
    from latentlab.models import Encoder

    torch.manual_seed(0)
    encoder, images = Encoder(latent_dim=8, width=4).eval(), torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        both = encoder.with_features(images)
        first = encoder.net[:2](images)
    assert both.shape == (5, 8 + 34 * 4)
    torch.testing.assert_close(both[:, :8], encoder(images))
    # each of the first layer's 4 channels of 14 x 14 in a 4 x 4 grid of cells; the top-left cell: rows, columns 0-3
    torch.testing.assert_close(both[:, 8:8 + 16 * 4:16], first[:, :, :4, :4].mean((2, 3)))


def test_deskew_straightens_and_centres_a_slanted_stroke():
    import torch

    image = torch.zeros(2, 1, 28, 28)
    for row in range(6, 22):  # a stroke leaning right (x grows as y falls), off centre
        image[0, 0, row, 6 + (22 - row) // 2: 9 + (22 - row) // 2] = 1
    image[1, 0, 6:22, 12:16] = 1  # upright and centred already
    cy, cx, cov = _moments(image)
    assert cov[0] < -5 and abs(float(cx[0]) - 13.5) > 1
    straight = fewshot.deskew(image)
    cy, cx, cov = _moments(straight)
    assert torch.allclose(cy, torch.full((2,), 13.5), atol=0.3) and torch.allclose(cx, torch.full((2,), 13.5), atol=0.3)
    assert cov.abs().max() < 0.5
    assert (straight[1] - image[1]).abs().max() < 1e-4  # nothing to straighten: the image is left as it was


def test_metrics_figures_and_saved_draws(first):
    run, fs = first
    assert fs["labels"] == 50 and fs["draws"] == 2 and fs["draw"] == "balanced"
    assert fs["reference"]["seed_mlp_frozen"] == 0.745 and fs["reference"]["seed_mlp_end_to_end"] == 0.607
    for name in ("seed_mlp_frozen", "seed_mlp_end_to_end", "poisson_balanced", "logistic_regression"):
        info = fs["methods"][name]
        assert set(info["test_accuracy"]) == {"mean", "std", "min"} and len(info["per_draw"]) == 2
        assert info["transductive"] is False
        assert info["test_accuracy"]["min"] == pytest.approx(min(info["per_draw"]), abs=1e-4)
        assert info["test_accuracy"]["mean"] == pytest.approx(np.mean(info["per_draw"]), abs=1e-4)
    assert len([n for n in fs["methods"] if n.endswith("_end_to_end")]) >= 4
    for name in ("poisson", "deskew_poisson", "deskew_poisson_balanced"):
        assert fs["methods"][name]["family"] == "graph" and fs["methods"][name]["uses_unlabelled_codes"] is True
    assert [a["method"] for a in fs["ablation"]] == ["logistic_regression", "poisson", "poisson_balanced",
                                                     "deskew_poisson", "deskew_poisson_balanced",
                                                     "deskew_poisson_ridge", "deskew_poisson_cnn"]
    assert all(a["seconds"] >= 0 for a in fs["ablation"]) and fs["ablation"][3]["seconds"] > 0
    for name in ("deskew_poisson_ridge", "deskew_poisson_cnn"):
        learner = fs["methods"][name]
        assert learner["family"] == "self-training" and learner["uses_unlabelled_codes"]
        assert len(learner["per_draw"]) == 2 and learner["transductive"] is False
    assert fs["self_training"]["labels"] in fs["methods"] and fs["self_training"]["labels"].startswith("deskew_")
    assert fs["ablation"][-1]["seconds"] > fs["ablation"][3]["seconds"]  # the graph it learns from, and its training
    # on balanced draws the label frequencies are uniform: both balancing targets are the same
    assert fs["methods"]["deskew_poisson_uniform"]["per_draw"] == fs["methods"]["deskew_poisson_balanced"]["per_draw"]
    assert fs["best_method"] in fs["methods"]
    curves = fs["curves"]
    assert curves["epochs"] == [0, 2, 4] and len(curves["seed_mlp_end_to_end"]["mean"]) == 3
    metrics = run.metrics()
    assert metrics["timings_s"]["fewshot"] > 0 and metrics["fewshot"] == fs
    for figure in ("fewshot_curves.png", "fewshot_methods.png"):
        assert (run.figures / figure).stat().st_size > 5000
    saved = json.loads((run.root / fs["labels_file"]).read_text())
    train_labels = Context(run=run, config=fewshot_config()).labels("train")
    for d in saved["draws"]:
        assert len(d["indices"]) == 50 and max(d["indices"]) < 3000
        assert train_labels[d["indices"]].tolist() == d["labels"]
        assert np.bincount(d["labels"], minlength=10).tolist() == [5] * 10
    assert saved["draws"][0]["indices"] != saved["draws"][1]["indices"]


def test_fixed_seed_reproduces_draws_and_accuracies(first, tiny_run, tmp_path):
    run, fs = first
    again = copy_run(tiny_run, tmp_path, "again")
    fs2 = run_stage(again, fewshot_config())
    assert (again.root / "fewshot_labels.json").read_text() == (run.root / "fewshot_labels.json").read_text()
    assert {n: m["per_draw"] for n, m in fs2["methods"].items()} == {n: m["per_draw"] for n, m in fs["methods"].items()}
    assert fs2["curves"] == fs["curves"]


def test_no_classifier_sees_more_than_the_drawn_labels(first, tiny_run, tmp_path, monkeypatch):
    """Corrupt every training label outside the drawn ones: not one accuracy may change."""
    run, fs = first
    saved = [np.array(d["indices"]) for d in json.loads((run.root / "fewshot_labels.json").read_text())["draws"]]
    drawn = np.unique(np.concatenate(saved))
    other = copy_run(tiny_run, tmp_path, "corrupted")
    config = fewshot_config()
    ctx = Context(run=other, config=config)
    true_labels = ctx.labels

    def corrupted(part):
        labels = true_labels(part).copy()
        if part == "train":
            hidden = np.setdiff1d(np.arange(len(labels)), drawn)
            labels[hidden] = (labels[hidden] + 1) % 10
        return labels

    monkeypatch.setattr(ctx, "labels", corrupted)
    queue = list(saved)
    monkeypatch.setattr(fewshot, "draw_labels", lambda *args, **kwargs: queue.pop(0))
    revealed = []
    real_reveal = fewshot.reveal
    monkeypatch.setattr(fewshot, "reveal", lambda labels, idx: revealed.append(len(idx)) or real_reveal(labels, idx))
    graph_sizes = []  # every graph is built on the training codes alone: no validation or test image in it
    real_graph = fewshot.code_graph
    monkeypatch.setattr(fewshot, "code_graph", lambda codes, k: graph_sizes.append(len(codes)) or real_graph(codes, k))
    cnn_training_sets = []  # the self-trained CNN learns from the training images alone
    real_train = fewshot.train_classifier
    monkeypatch.setattr(fewshot, "train_classifier", lambda cfg, train, *args, **kw:
                        cnn_training_sets.append(len(train)) or real_train(cfg, train, *args, **kw))
    ridge_training_sets = []  # ... and so does the self-trained ridge

    class RecordingRidge(fewshot.Ridge):
        def fit(self, x, y):
            ridge_training_sets.append((len(x), y.shape[1]))
            return super().fit(x, y)

    monkeypatch.setattr(fewshot, "Ridge", RecordingRidge)
    fs2 = fewshot.stage(ctx)["fewshot"]
    assert revealed == [50, 50]
    assert graph_sizes == [3000, 3000]  # the codes' graph and the deskewed codes' graph
    assert cnn_training_sets == [3000, 3000]
    assert ridge_training_sets == [(3000, 20)]  # one solve: both draws' ten classes
    assert {"deskew_poisson", "deskew_poisson_balanced", "deskew_poisson_ridge", "deskew_poisson_cnn"} <= set(fs2["methods"])
    assert {n: m["per_draw"] for n, m in fs2["methods"].items()} == {n: m["per_draw"] for n, m in fs["methods"].items()}


def test_random_draw_runs_even_when_a_digit_is_missing(tiny_run, tmp_path, monkeypatch):
    """A random draw of 50 can miss a digit: every method must still run and label every test image."""
    def without_sevens(train_labels, *, per_class, draw, seed):
        return np.sort(np.random.default_rng(seed).choice(np.flatnonzero(train_labels != 7), 50, replace=False))

    monkeypatch.setattr(fewshot, "draw_labels", without_sevens)
    config = fewshot_config(draw="random", draws=1, epochs=1, curve_every=1, self_train_epochs=0)
    fs = run_stage(copy_run(tiny_run, tmp_path, "random"), config)
    assert fs["draw"] == "random"
    assert "deskew_poisson_cnn" not in fs["methods"]  # self-training is off unless asked for
    for name in ("poisson", "poisson_balanced", "poisson_uniform", "poisson_volume", "deskew_poisson",
                 "deskew_poisson_ridge"):
        # the test set's 7s (about 10%) cannot be right, everything else can
        assert 0.3 < fs["methods"][name]["test_accuracy"]["mean"] < 0.9


def test_cli_draw_options_and_bad_settings():
    args = build_parser().parse_args(["fewshot", "--run", "x", "--draw", "random", "--draws", "3"])
    config = resolve_config(args)
    assert config.fewshot.draw == "random" and config.fewshot.draws == 3
    with pytest.raises(LatentlabError, match="fewshot.self_train_epochs=2: .* needs fewshot.deskew=true"):
        validate(fewshot_config(self_train_epochs=2, deskew=False))
    for key, value in (("balance", 1.5), ("draws", 0), ("train_limit", -1), ("self_train_epochs", -1)):
        config = fewshot_config(**{key: value})
        with pytest.raises(LatentlabError, match=f"fewshot.{key}"):
            validate(config)


def test_stacked_torch_solve_matches_graphlearning_draw_by_draw():
    """Every draw's columns in one float32 conjugate-gradient solve give graphlearning's Poisson labels."""
    import graphlearning as gl
    import torch

    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=1.5, size=(10, 5))
    labels = np.repeat(np.arange(10), 60)
    points = torch.from_numpy(centres[labels] + rng.normal(size=(600, 5))).float()
    weights, _ = fewshot.code_graph(points, 10)
    assert connected_components(weights)[0] == 1  # as the codes' graph is: Poisson learning needs one component
    draws = [fewshot.draw_labels(labels, per_class=2, draw="balanced", seed=s) for s in (1, 2)]
    labelled = [labels[d] for d in draws]
    labels_of = fewshot.poisson_labels(weights, draws, labelled, 0.75, torch.device("cpu"))
    sources, groups = fewshot.poisson_sources(600, draws, [np.unique(y, return_inverse=True) for y in labelled])
    u = fewshot.poisson_solve(weights, sources, groups).numpy()
    for i, (indices, y) in enumerate(zip(draws, labelled)):
        reference = gl.ssl.poisson(weights, tol=fewshot.POISSON_TOL).fit(indices, y)
        assert np.abs(u[:, 10 * i:10 * (i + 1)] - reference).max() < 1e-2 * np.abs(reference).max()
        assert (u[:, 10 * i:10 * (i + 1)].argmax(1) == reference.argmax(1)).mean() > 0.99
        assert (labels_of[i]["poisson"] == np.unique(y)[reference.argmax(1)]).mean() > 0.99
    # the draws' decisions made in threads are the same decisions, in the draws' order
    threaded = fewshot.poisson_labels(weights, draws, labelled, 0.75, torch.device("cpu"), workers=2)
    assert all(set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(labels_of, threaded))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(12, 90), k=st.integers(1, 10), batch=st.integers(1, 40), chunk=st.integers(1, 50),
       slices=st.integers(1, 6), exclude=st.booleans(), seed=st.integers(0, 1000))
def test_tiled_nearest_matches_a_full_sort(n, k, batch, chunk, slices, exclude, seed):
    """The tiled neighbour search gives what sorting every similarity gives, whatever the tile sizes."""
    from latentlab.fewshot import nearest

    points = torch.nn.functional.normalize(torch.randn(n, 5, generator=torch.Generator().manual_seed(seed)), dim=1)
    similarity = points @ points.T
    if exclude:
        similarity.fill_diagonal_(-float("inf"))
    expected = similarity.sort(dim=1, descending=True).indices[:, :k]
    distances, indices = nearest(points, points, k, exclude_self=exclude, batch_size=batch, chunk=chunk,
                                 slices=slices)
    assert torch.equal(indices, expected)
    assert torch.allclose(distances, (points[:, None] - points[expected]).norm(dim=2), atol=1e-3)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 6), slices=st.integers(1, 8), width=st.integers(1, 12), k=st.integers(1, 12),
       ties=st.booleans(), seed=st.integers(0, 1000))
def test_best_in_tile_is_topk(rows, slices, width, k, ties, seed):
    """The two-step pick (maxima across slices, then their candidates) gives topk's values, and columns that
    hold those values; without ties, topk's very columns."""
    from latentlab.fewshot import best_in_tile

    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, slices * width, generator=generator)
    if ties:  # few distinct values, and some -inf, as the own-point mask leaves
        values = values.round()
        values[values < -1] = -float("inf")
    top, columns = best_in_tile(values, k, slices)
    expected = values.topk(min(k, values.shape[1]), dim=1)
    assert torch.equal(top, expected.values)
    assert torch.equal(values.gather(1, columns), top)
    assert all(len(set(row.tolist())) == len(row) for row in columns)  # k different columns
    if not ties:
        assert torch.equal(columns, expected.indices)


def test_a_digit_without_labels_is_found_by_the_uniform_decision():
    """A random draw can miss a digit: its codes, which no label reaches, become that digit in poisson_uniform
    (the one decision that assumes every digit is a tenth of the codes); the other decisions cannot name it."""
    import torch

    rng = np.random.default_rng(1)
    centres = rng.normal(scale=2.0, size=(10, 16))  # ten digits, apart as the codes' digits mostly are
    labels = np.repeat(np.arange(10), 60)
    points = torch.from_numpy(centres[labels] + rng.normal(size=(600, 16))).float()
    weights, _ = fewshot.code_graph(points, 10)
    draw = np.concatenate([np.flatnonzero(labels == d)[:3] for d in range(1, 10)])  # no label of a 0
    decisions = fewshot.poisson_labels(weights, [draw], [labels[draw]], 0.75, torch.device("cpu"))[0]
    assert not (decisions["poisson"] == 0).any() and not (decisions["poisson_balanced"] == 0).any()
    uniform = decisions["poisson_uniform"]
    assert np.mean(uniform[labels == 0] == 0) > 0.9 and np.mean(uniform == labels) > 0.95
    assert np.mean(decisions["poisson"] == labels) < 0.91  # the zeros went to other digits


@pytest.mark.parametrize("vmapped", [False, True])
def test_stacked_copies_train_as_each_would_alone(vmapped):
    """Trained together (the CPU's loop, or the GPU's vmap, here on the CPU), each draw's copy of an encoder
    and head ends where the same model trained alone on its own examples ends."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from latentlab.models import Encoder, adam

    torch.manual_seed(0)
    models = [nn.Sequential(Encoder(latent_dim=8, width=4), fewshot.make_head([(16, "sigmoid")], 8))
              for _ in range(3)]
    inputs, labels = torch.rand(3, 12, 1, 28, 28), torch.randint(0, 10, (3, 12))
    stacked = fewshot.Stacked(models, vmapped=vmapped)
    for _ in range(5):
        stacked.step(inputs, labels)
    together = stacked.predict(inputs.flatten(0, 1))
    for i, model in enumerate(models):
        alone = copy.deepcopy(model)
        optimizer = adam(alone.parameters(), lr=fewshot.LEARNING_RATE)
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(alone(inputs[i]), labels[i]).backward()
            optimizer.step()
        with torch.no_grad():
            logits = alone(inputs.flatten(0, 1))
        assert (logits.argmax(1).numpy() == together[i]).mean() > 0.97
        copy_logits = stacked.copies()[i](inputs.flatten(0, 1))
        assert torch.allclose(copy_logits, logits, atol=1e-4)
        assert not torch.allclose(model(inputs.flatten(0, 1)), logits, atol=1e-4)  # it did train


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(1, 9), min_size=2, max_size=10), seed=st.integers(0, 1000))
def test_poisson_sources_give_every_class_the_same_weight(counts, seed):
    """Each class's labels carry the same total in its column, every column sums to zero, and a balanced draw
    gets graphlearning's source (onehot - mean) exactly."""
    rng = np.random.default_rng(seed)
    local = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    indices = rng.choice(100, len(local), replace=False)
    sources, groups = fewshot.poisson_sources(100, [indices], [(np.arange(len(counts)), local)])
    sources = sources.numpy()
    assert sources.shape == (100, len(counts)) and (groups.numpy() == 0).all()
    own = [sources[indices[local == c], c].sum() for c in range(len(counts))]
    assert np.allclose(own, own[0])
    assert np.allclose(sources.sum(0), 0)
    if len(set(counts)) == 1:
        onehot = np.eye(len(counts))[local]
        assert np.array_equal(sources[indices], onehot - onehot.mean(axis=0))
