"""The latent flow: it learns a known 2-D mixture, repeats with its seed, round-trips its checkpoint, is scored
beside the GANs, and `latentlab sample --model flow` works and refuses bad input in one line."""
import dataclasses
import shutil

import numpy as np
import pytest
import torch

from latentlab import flow
from latentlab.cli import main
from latentlab.config import FlowConfig
from latentlab.errors import LatentlabError
from latentlab.gan import load_decoder
from latentlab.models import CodeStats
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run
from tests.conftest import tiny_config

MODES = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [-2.0, -2.0], [2.0, -2.0]])


def mixture(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of four tight Gaussians at MODES, and which mode each came from (its "digit")."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    return MODES[labels] + 0.1 * torch.randn(n, 2, generator=gen), labels


def nearest_mode(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(points, MODES)          # (N, 4)
    return distances.min(1).indices, distances.min(1).values


TINY = FlowConfig(steps=1200, batch_size=128, lr=3e-3, hidden=64, layers=2, embed_dim=16, label_dropout=0.5,
                  ema=0.99, guidance=1.0, solver="heun", ode_steps=8, log_every=100)


@pytest.fixture(scope="module")
def mixture_field():
    points, labels = mixture(2000)
    model, history = flow.train_flow(TINY, points, labels, seed=0)
    return model, history


def test_it_learns_the_modes_of_a_2d_mixture(mixture_field):
    model, history = mixture_field
    assert history["loss"][-1] < history["loss"][0]
    noise = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    for mode in range(4):  # asked for one mode, it lands on that mode
        out = flow.integrate(model, noise, torch.full((400,), mode), steps=8)
        which, distance = nearest_mode(out)
        assert (which == mode).float().mean() >= 0.9 and distance.median() < 0.5, mode
    # with no digit it lands near some mode, and visits all four about equally
    which, distance = nearest_mode(flow.integrate(model, noise, None, steps=8))
    assert distance.median() < 0.5
    shares = torch.bincount(which, minlength=4).float() / 400
    assert shares.min() >= 0.12, shares
    # guidance 0 ignores the digit: the "no digit" field all the way, as sampling with no digit does without the head
    ignored = flow.integrate(model, noise, torch.zeros(400, dtype=torch.long), guidance=0.0)
    head, model.digit_head = model.digit_head, None
    try:
        assert torch.equal(ignored, flow.integrate(model, noise, None))
    finally:
        model.digit_head = head


def test_no_digit_samples_follow_the_digits_fields_weighted_by_the_heads_guess(mixture_field):
    """From MIXTURE_FROM on, a sample with no digit moves along sum_d p(d | x_t) v(x_t, d), p from the digit head,
    digits under MIXTURE_FLOOR left out; the head has learnt which mode a point is heading for."""
    model, history = mixture_field
    assert history["digit_loss"][-1] < history["digit_loss"][0]
    gen = torch.Generator().manual_seed(6)
    points, labels = mixture(400, seed=6)
    with torch.no_grad():
        for t in (0.1, 0.5, 0.9):
            xt = (1 - t) * torch.randn(400, 2, generator=gen) + t * points
            times = torch.full((400,), t)
            weights = model(xt, times, torch.full((400,), flow.NO_DIGIT), with_logits=True)[1].softmax(1)
            if t == 0.9:  # near the data, the head names the mode of nearly every point
                assert (weights.argmax(1) == labels).float().mean() >= 0.95
            assert weights[:, 4:].max() < flow.MIXTURE_FLOOR   # digits never seen get no weight
            kept = torch.where(weights >= flow.MIXTURE_FLOOR, weights, 0)
            kept = kept / kept.sum(1, keepdim=True)
            expected = sum(kept[:, d, None] * model(xt, times, torch.full((400,), d)) for d in range(10))
            assert torch.allclose(flow.digit_mixture_velocity(model, xt, times), expected, atol=1e-5)
            field = model(xt, times, torch.full((400,), flow.NO_DIGIT))
            got = flow.velocity(model, xt, t, None, 1.0)
            if t >= flow.MIXTURE_FROM:
                assert torch.allclose(got, expected, atol=1e-5)
            else:  # early on, the "no digit" field: every digit is about as likely there
                assert torch.equal(got, field)


def test_no_digit_trained_on_the_fields_own_digit_velocity_learns_the_mixture_too():
    """With `no_digit_target="own_digit"` the "no digit" rows regress onto the field's own velocity for each code's
    digit instead of the path's (x1 - x0): the same modes, with and without a digit."""
    points, labels = mixture(2000)
    model, _ = flow.train_flow(dataclasses.replace(TINY, no_digit_target="own_digit"), points, labels, seed=0)
    noise = torch.randn(400, 2, generator=torch.Generator().manual_seed(1))
    which, distance = nearest_mode(flow.integrate(model, noise, None, steps=8))
    assert distance.median() < 0.5 and torch.bincount(which, minlength=4).min() >= 0.12 * 400
    which, _ = nearest_mode(flow.integrate(model, noise, torch.full((400,), 2), steps=8))
    assert (which == 2).float().mean() >= 0.9


def test_rescaled_guidance_keeps_the_digits_own_speed(mixture_field):
    """guidance_rescale=1: the guided velocity points where plain guidance does, at the length of the digit's own
    velocity; 0 is plain guidance; in between, a mix of the two."""
    model, _ = mixture_field
    x, t, digit = torch.randn(64, 2, generator=torch.Generator().manual_seed(4)), 0.4, torch.full((64,), 3)
    with torch.no_grad():
        plain = flow.velocity(model, x, t, digit, 2.5)
        full = flow.velocity(model, x, t, digit, 2.5, rescale=1.0)
        half = flow.velocity(model, x, t, digit, 2.5, rescale=0.5)
        own = flow.velocity(model, x, t, digit, 1.0)
    assert torch.allclose(full.norm(dim=1), own.norm(dim=1), rtol=1e-5)
    assert torch.allclose(torch.nn.functional.cosine_similarity(full, plain), torch.ones(64), atol=1e-5)
    assert torch.allclose(half, (plain + full) / 2, atol=1e-6)
    assert not torch.allclose(plain.norm(dim=1), own.norm(dim=1), rtol=1e-2)  # plain guidance lengthens it
    assert torch.equal(flow.velocity(model, x, t, digit, 2.5, rescale=0.0), plain)


def test_guidance_pushes_away_from_a_mix_of_the_no_digit_field_and_the_blend(mixture_field):
    """guidance_reference r: from MIXTURE_FROM on, v = ref + g (v(digit) - ref) with ref = (1 - r) field + r blend;
    r = 0 (and any r before MIXTURE_FROM, or in a network without a digit head) is plain guidance."""
    model, _ = mixture_field
    x, digit = torch.randn(64, 2, generator=torch.Generator().manual_seed(7)), torch.arange(64) % 4
    with torch.no_grad():
        for t in (0.1, 0.5):
            times = torch.full((64,), t)
            own = model(x, times, digit)
            field = model(x, times, torch.full((64,), flow.NO_DIGIT))
            blend = flow.digit_mixture_velocity(model, x, times)
            reference = field if t < flow.MIXTURE_FROM else 0.6 * field + 0.4 * blend
            expected = reference + 2.0 * (own - reference)
            assert torch.allclose(flow.velocity(model, x, t, digit, 2.0, reference=0.4), expected, atol=1e-5)
            assert torch.allclose(flow.velocity(model, x, t, digit, 2.0, reference=0.0), field + 2.0 * (own - field),
                                  atol=1e-5)
            # the asked digits' fields come from the blend's pass, whether the head finds them likely or not, and
            # add nothing to the blend
            likely = model(x, times, torch.full((64,), flow.NO_DIGIT), with_logits=True)[1].softmax(1)
            asked_weight = likely[torch.arange(64), digit]
            assert (asked_weight < flow.MIXTURE_FLOOR).any() and (asked_weight >= flow.MIXTURE_FLOOR).any()
            blend_too, field_too, own_too = flow.digit_mixture_velocity(model, x, times, asked=digit)
            assert torch.equal(blend_too, blend) and torch.equal(field_too, field)
            assert torch.allclose(own_too, own, atol=1e-6)
        assert not torch.allclose(blend, field, atol=1e-2)  # the blend is not the "no digit" field: the test can fail


def test_solvers_agree_when_given_enough_steps(mixture_field):
    model, _ = mixture_field
    noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(2))
    digit = torch.full((50,), 1)
    fine = flow.integrate(model, noise, digit, solver="euler", steps=400)
    for solver in flow.SOLVERS:
        assert torch.allclose(flow.integrate(model, noise, digit, solver=solver, steps=64), fine, atol=0.05), solver
    with pytest.raises(LatentlabError, match="choose euler"):
        flow.integrate(model, noise, digit, solver="rk45")


@pytest.mark.parametrize("steps", [1, 2, 8])
def test_heun_never_asks_the_field_at_the_end_of_the_path(steps):
    """Heun averages the slopes at both ends of each step, but its last step is Euler's: the field at t = 1, the
    least trained, is never evaluated (2 * steps - 1 evaluations); Euler's is the same path's first-order form."""
    times = []

    class Field(torch.nn.Module):  # a linear field that records the times it is asked at
        latent_dim, digit_head = 2, None

        def forward(self, x, t, digit):
            times.extend(t.unique().tolist())
            return -x + t[:, None]

    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    heun = flow.integrate(Field(), noise, None, solver="heun", steps=steps)
    assert len(times) == 2 * steps - 1 and max(times) == pytest.approx(1 - 1 / steps) and min(times) == 0
    times.clear()
    euler = flow.integrate(Field(), noise, None, solver="euler", steps=steps)
    assert len(times) == steps
    assert torch.equal(heun, euler) == (steps == 1)  # one step: Heun is Euler; more: the inner steps differ


def test_training_and_sampling_repeat_with_the_seed():
    points, labels = mixture(300)
    cfg = FlowConfig(steps=30, batch_size=32, hidden=16, layers=1, embed_dim=8, log_every=10)
    first, h1 = flow.train_flow(cfg, points, labels, seed=3)
    second, h2 = flow.train_flow(cfg, points, labels, seed=3)
    other, _ = flow.train_flow(cfg, points, labels, seed=4)
    assert h1 == h2 and len(h1["loss"]) == 3
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))


def test_checkpoint_round_trip(tmp_path, mixture_field):
    model, _ = mixture_field
    run = Run(tmp_path / "run", create=True)
    mean, std = torch.tensor([1.0, -1.0]), torch.tensor([2.0, 0.5])
    run.save_checkpoint("flow", flow.checkpoint(model, TINY, CodeStats(mean, std)))
    loaded = flow.load_flow(run)  # rebuilt from the file alone
    assert (loaded.guidance, loaded.solver, loaded.ode_steps) == (TINY.guidance, TINY.solver, TINY.ode_steps)
    assert torch.equal(loaded.stats.mean, mean) and torch.equal(loaded.stats.std, std)
    noise, digits = torch.randn(20, 2, generator=torch.Generator().manual_seed(5)), torch.arange(20) % 4
    expected = flow.integrate(model, noise, digits, steps=TINY.ode_steps) * std + mean
    assert torch.allclose(flow.generate_codes(loaded, noise, digits), expected, atol=1e-6)
    # the digit head travels with it (samples with no digit the same, from noise scaled by the temperature); a
    # checkpoint from before the head has no head and samples with no digit from its "no digit" field
    assert loaded.model.digit_head is not None and loaded.no_digit_temperature == TINY.no_digit_temperature != 1
    wider = noise * TINY.no_digit_temperature
    assert torch.allclose(flow.generate_codes(loaded, noise), flow.integrate(model, wider) * std + mean, atol=1e-6)
    older = flow.checkpoint(model, TINY, CodeStats(mean, std))
    del older["model_args"]["digit_head"], older["state_dict"]["digit_head.weight"], older["state_dict"]["digit_head.bias"]
    run.save_checkpoint("flow", older)
    assert flow.load_flow(run).model.digit_head is None
    older["model_args"]["digit_head"] = 2
    run.save_checkpoint("flow", older)
    with pytest.raises(LatentlabError, match="digit_head=2 must be 0 or 1"):
        flow.load_flow(run)
    # the guidance rescale and reference travel with the checkpoint; one saved before them samples with plain guidance
    # (and so does the temperature: one saved before it samples from the noise as drawn)
    rescaled = dataclasses.replace(TINY, guidance=2.0, guidance_rescale=0.7, guidance_reference=0.3,
                                   no_digit_temperature=1.2)
    run.save_checkpoint("flow", flow.checkpoint(model, rescaled, CodeStats(mean, std)))
    loaded = flow.load_flow(run)
    assert (loaded.guidance, loaded.guidance_rescale, loaded.guidance_reference) == (2.0, 0.7, 0.3)
    assert loaded.no_digit_temperature == 1.2
    older = flow.checkpoint(model, rescaled, CodeStats(mean, std))
    del older["sampling"]["guidance_rescale"], older["sampling"]["guidance_reference"]
    del older["sampling"]["no_digit_temperature"]
    run.save_checkpoint("flow", older)
    loaded = flow.load_flow(run)
    assert (loaded.guidance_rescale, loaded.guidance_reference, loaded.no_digit_temperature) == (0.0, 0.0, 1.0)
    assert torch.allclose(flow.generate_codes(loaded, noise), flow.integrate(model, noise) * std + mean, atol=1e-6)
    older["sampling"]["no_digit_temperature"] = 0
    run.save_checkpoint("flow", older)
    with pytest.raises(LatentlabError, match="sampling.no_digit_temperature"):
        flow.load_flow(run)
    del older["sampling"]["no_digit_temperature"]
    older["sampling"]["guidance_rescale"] = 2.0
    run.save_checkpoint("flow", older)
    with pytest.raises(LatentlabError, match="sampling.guidance_rescale"):
        flow.load_flow(run)
    # arguments no run's settings can make are refused before any model is built (65,536 layers took a minute)
    huge = flow.checkpoint(model, TINY, CodeStats(mean, std))
    huge["model_args"]["layers"] = 65_536
    run.save_checkpoint("flow", huge)
    with pytest.raises(LatentlabError, match="model_args layers=65536 is outside what flow.layers allows"):
        flow.load_flow(run)
    # a flow checkpoint without its sampling settings, or with broken statistics, is refused in one line
    ckpt = flow.checkpoint(model, TINY, CodeStats(mean, std))
    del ckpt["sampling"]
    run.save_checkpoint("flow", ckpt)
    with pytest.raises(LatentlabError, match="sampling settings missing"):
        flow.load_flow(run)
    run.save_checkpoint("flow", flow.checkpoint(model, TINY, CodeStats(mean, torch.tensor([2.0, 0.0]))))
    with pytest.raises(LatentlabError, match="code_std must be > 0"):
        flow.load_flow(run)
    odd = flow.checkpoint(model, TINY, CodeStats(mean, std))
    odd["model_args"]["embed_dim"] = 15  # builds, loads its weights, then fails in the first pass
    odd["state_dict"]["time.weight"] = odd["state_dict"]["time.weight"][:, :15]
    run.save_checkpoint("flow", odd)
    with pytest.raises(LatentlabError, match="embed_dim=15 must be even"):
        flow.load_flow(run)
    run.save_checkpoint("gan", flow.checkpoint(model, TINY, CodeStats(mean, std)))  # a flow where the GAN belongs
    with pytest.raises(LatentlabError, match="not the 'gan' asked for"):
        run.load_model("gan", flow.VelocityField, "train-gan")


def test_stage_and_evaluation_sections(gan_run, tmp_path):
    """The flow stage's section, and the evaluation's flow.quality / quality_unconditional with cgan.quality's keys."""
    run = Run(shutil.copytree(gan_run.root, tmp_path / "run"))
    section = run.metrics()["flow"]
    assert section["steps"] == tiny_config().flow.steps and section["train_seconds"] > 0
    assert len(section["history"]["loss"]) == len(section["history"]["step"]) >= 1
    assert (run.figures / "flow_samples.png").stat().st_size > 1000
    pipeline = Pipeline(run, tiny_config())
    pipeline.run_stage("baselines")
    pipeline.run_stage("evaluation")
    metrics = run.metrics()
    cgan_keys = set(metrics["cgan"]["quality"])
    assert set(metrics["flow"]["quality"]) == cgan_keys
    assert set(metrics["flow"]["quality_unconditional"]) == cgan_keys
    assert metrics["flow"]["quality_unconditional"]["accuracy"] is None  # no digit was asked for
    assert abs(sum(metrics["flow"]["quality_unconditional"]["class_histogram"]) - 1) < 1e-6
    sweep = metrics["flow"]["sweep"]
    assert list(sweep["by_ode_steps"]) == ["1", "2", "4", "8", "16", "32"]
    assert all(v["frechet_distance"] > 0 for v in sweep["by_ode_steps"].values())
    assert "best on Frechet distance" in metrics["flow"]["verdict"]
    assert metrics["flow"]["train_seconds"] == section["train_seconds"]  # the stage's own keys are kept
    assert (run.figures / "flow_sweep.png").is_file()
    # the report says how samples with no digit were drawn, and the stage's section names the setting
    assert section["no_digit_sampling"] == "digit_mixture" and "digit_loss" in section["history"]
    from latentlab.report import flow_part
    assert "the digits' own fields weighted by the network's guess" in flow_part(metrics["flow"], run.root)
    assert "own fields" not in flow_part({**metrics["flow"], "no_digit_sampling": "field"}, run.root)
    assert section["no_digit_temperature"] == tiny_config().flow.no_digit_temperature
    assert "noise of spread 1.06" in flow_part(metrics["flow"], run.root)
    assert "spread" not in flow_part({**metrics["flow"], "no_digit_temperature": 1}, run.root)


def sample(run, *args) -> int:
    return main(["sample", "--run", str(run.root), *map(str, args)])


def test_sample_with_the_flow(gan_run, tmp_path):
    files = {name: tmp_path / f"{name}.npz" for name in ("a", "b", "c", "any")}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        assert sample(gan_run, "--count", 6, "--out", files[name], "--seed", seed, "--digit", 5, "--model", "flow") == 0
    a, b, c = (np.load(files[n]) for n in ("a", "b", "c"))
    assert np.array_equal(a["images"], b["images"]) and not np.array_equal(a["images"], c["images"])
    assert a["images"].shape == (6, 28, 28) and a["labels"].tolist() == [5] * 6
    assert sample(gan_run, "--count", 4, "--out", files["any"], "--model", "flow") == 0  # no digit: unconditional
    with np.load(files["any"]) as f:
        assert f["labels"].tolist() == [-1] * 4
        expected = flow.sample_images(flow.load_flow(gan_run), load_decoder(gan_run), 4, seed=0)
        assert np.array_equal(f["images"], expected)


def test_sample_errors_are_one_line(gan_run, tiny_run, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert sample(gan_run, "--count", 4, "--out", out, "--model", "vae") == 2
    assert capsys.readouterr().err == "latentlab: error: --model vae: choose gan or flow\n"
    assert sample(tiny_run, "--count", 4, "--out", out, "--model", "flow") == 2
    err = capsys.readouterr().err
    assert "flow.pt: checkpoint is missing; train it with `latentlab train-flow" in err and err.count("\n") == 1
    assert sample(gan_run, "--count", 4, "--out", out, "--model", "flow", "--digit", 10) == 2
    assert capsys.readouterr().err == "latentlab: error: --digit 10: must be a digit from 0 to 9\n"
    assert not out.exists()


@pytest.mark.parametrize("setting, message", [
    ("flow.solver=rk4", "one of euler, midpoint, heun"), ("flow.label_dropout=1", "a number in [0, 1)"),
    ("flow.ode_steps=0", "a whole number 1-1000"), ("flow.guidance=-1", "a number in [0, 20]"),
    ("flow.embed_dim=15", "must be even"), ("flow.no_digit_target=mean", "one of path, own_digit"),
    ("flow.guidance_rescale=1.5", "a number in [0, 1]"),
    ("flow.guidance_reference=2", "a number in [0, 1]"), ("flow.no_digit_sampling=blend", "one of field, digit_mixture"), ("flow.digit_loss_weight=-1", "a number in [0, 100]"),
    ("flow.no_digit_temperature=0", "a number in (0, 4]"),
])
def test_bad_flow_settings_are_one_line_errors(tiny_run, setting, message, capsys):
    assert main(["train-flow", "--run", str(tiny_run.root), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentlab: error: flow.") and message in err and err.count("\n") == 1


def test_the_average_of_a_short_run_is_not_its_random_start():
    """The kept weights (EMA 0.999) of a 40-step run sit near the last weights, not the initial ones."""
    points, labels = mixture(300)
    cfg = FlowConfig(steps=40, batch_size=32, hidden=16, layers=1, embed_dim=8, log_every=10, lr=1e-2)
    averaged, _ = flow.train_flow(cfg, points, labels, seed=3)
    last, _ = flow.train_flow(FlowConfig(**{**cfg.__dict__, "ema": 0.0}), points, labels, seed=3)
    torch.manual_seed(3)
    start = flow.VelocityField(latent_dim=2, hidden=16, layers=1, embed_dim=8)

    def distance(a, b):
        return sum((p - q).norm() ** 2 for p, q in zip(a.parameters(), b.parameters())).sqrt()

    assert distance(averaged, last) < 0.5 * distance(averaged, start)


def test_evaluation_with_gans_of_different_noise_sizes(gan_run, tmp_path):
    run = Run(shutil.copytree(gan_run.root, tmp_path / "run"))
    config = tiny_config()
    config.gan.noise_dim = 2 * config.cgan.noise_dim  # the flow's evaluation times both GANs with their own noise
    pipeline = Pipeline(run, config)
    pipeline.run_stage("gan")
    pipeline.run_stage("baselines")
    pipeline.run_stage("evaluation")
    assert run.metrics()["flow"]["sampling_seconds"]["gan_10k_codes_seconds"] > 0


def test_stages_that_read_the_flow_refuse_to_start_without_it(gan_run, tmp_path, capsys):
    run = Run(shutil.copytree(gan_run.root, tmp_path / "run"))
    (run.checkpoints / "flow.pt").unlink()
    config_before = (run.root / "config.json").read_text()
    for command in ("evaluate", "interpolate"):
        assert main([command, "--run", str(run.root)]) == 2
        err = capsys.readouterr().err
        assert "flow.pt: checkpoint is missing; train it with `latentlab train-flow" in err and err.count("\n") == 1
    assert (run.root / "config.json").read_text() == config_before  # nothing written before the check
