"""The latent GANs: training stages, checkpoints, divergence stops and reproducible samples."""
import shutil

import numpy as np
import pytest
import torch

from latentlab import gan as gan_module
from latentlab.cli import main
from latentlab.config import GANConfig
from latentlab.errors import LatentlabError
from latentlab.gan import generate_codes, load_decoder, load_gan, sample_images, train_gan
from latentlab.pipeline import Pipeline
from latentlab.runfolder import Run

from tests.conftest import tiny_config


def copy_run(run: Run, tmp_path) -> Run:
    return Run(shutil.copytree(run.root, tmp_path / "run"))


def test_gan_stages_write_checkpoints_figures_and_metrics(gan_run):
    metrics = gan_run.metrics()
    for name, conditional in (("gan", False), ("cgan", True)):
        section = metrics[name]
        assert section["diverged"] is False and section["steps"] == 50 and section["conditional"] is conditional
        assert np.isfinite([section["final_loss_d"], section["final_loss_g"]]).all()
        assert section["history"]["step"][-1] == 50
        assert (gan_run.figures / f"{name}_samples.png").stat().st_size > 1000
        gan = load_gan(gan_run, conditional=conditional)
        assert gan.conditional is conditional and gan.stats.mean.shape == gan.stats.std.shape == (16,)
        assert torch.load(gan_run.checkpoints / f"{name}.pt", weights_only=True)["step"] == 50


def test_generated_codes_are_unstandardised(gan_run):
    gan = load_gan(gan_run, conditional=False)
    noise = torch.randn(5, gan.noise_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = gan.generator(noise)
    assert torch.allclose(generate_codes(gan, noise), raw * gan.stats.std + gan.stats.mean)
    cgan = load_gan(gan_run, conditional=True)
    with pytest.raises(LatentlabError, match="needs a digit"):
        generate_codes(cgan, noise)


def test_sampled_images_are_the_decoded_codes_with_255_for_ink(gan_run):
    """MNIST's convention: the decoder's 1 (ink, as in its training images) becomes 255, background 0."""
    gan, decoder = load_gan(gan_run, conditional=False), load_decoder(gan_run)
    noise = torch.randn(6, gan.noise_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = (decoder(generate_codes(gan, noise)).squeeze(1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(sample_images(gan, decoder, 6, seed=2), expected)


def test_fixed_seed_gives_the_same_samples(gan_run):
    decoder = load_decoder(gan_run)
    for conditional, digit in ((False, None), (True, 7)):
        gan = load_gan(gan_run, conditional=conditional)
        first = sample_images(gan, decoder, 12, digit=digit, seed=3)
        assert first.dtype == np.uint8 and first.shape == (12, 28, 28)
        assert np.array_equal(first, sample_images(gan, decoder, 12, digit=digit, seed=3))
        assert not np.array_equal(first, sample_images(gan, decoder, 12, digit=digit, seed=4))


def test_conditional_sampling_takes_one_digit_or_one_per_image(gan_run):
    cgan = load_gan(gan_run, conditional=True)
    decoder = load_decoder(gan_run)
    per_image = sample_images(cgan, decoder, 4, digit=np.array([7, 7, 7, 7]), seed=1)
    assert np.array_equal(per_image, sample_images(cgan, decoder, 4, digit=7, seed=1))
    with pytest.raises(LatentlabError, match="plain GAN"):
        sample_images(load_gan(gan_run, conditional=False), decoder, 4, digit=3)


def test_training_is_reproducible_from_its_seed():
    codes = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(500) % 10
    cfg = GANConfig(steps=20, noise_dim=4, hidden=16, batch_size=32)
    first, _ = train_gan(cfg, codes, labels, seed=5)
    second, _ = train_gan(cfg, codes, labels, seed=5)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_the_average_of_a_short_run_is_not_its_random_start():
    """The kept generator (EMA 0.999) of a 40-step run sits near the last weights, not the initial ones."""
    codes = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    cfg = GANConfig(steps=40, noise_dim=4, hidden=16, batch_size=32, log_every=10, checkpoint_every=40)
    averaged, _ = train_gan(cfg, codes, seed=3)
    last, _ = train_gan(GANConfig(**{**cfg.__dict__, "ema": 0.0}), codes, seed=3)
    torch.manual_seed(3)
    start = gan_module.Generator(4, 8, 16, 0)

    def distance(a, b):
        return sum((p - q).norm() ** 2 for p, q in zip(a.parameters(), b.parameters())).sqrt()

    assert distance(averaged, last) < 0.5 * distance(averaged, start)


def test_absurd_learning_rate_stops_with_one_line_and_status_2(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path)
    code = main(["train-gan", "--run", str(run.root), "--set", "gan.steps=50", "--set", "gan.batch_size=64",
                 "--set", "gan.lr=1"])  # the largest accepted learning rate diverges at once
    err = capsys.readouterr().err.split("\r")[-1]  # after the progress bar, which tqdm clears
    assert code == 2
    assert err.startswith("latentlab: error: gan: training diverged at step") and err.count("\n") == 1
    assert "no checkpoint was saved" in err and "--set gan.lr" in err
    assert not (run.checkpoints / "gan.pt").exists()
    section = run.metrics()["gan"]
    assert section["diverged"] is True and section["last_good_step"] is None


def test_divergence_keeps_the_last_good_checkpoint(tiny_run, tmp_path, monkeypatch):
    """A NaN loss at step 25 stops training; the checkpoint saved at step 20 stays and still samples."""
    run = copy_run(tiny_run, tmp_path)
    real_loss, calls = gan_module.generator_loss, []

    def nan_from_step_25(fake_logits, loss):
        calls.append(1)
        value = real_loss(fake_logits, loss)
        return value * float("nan") if len(calls) >= 25 else value

    monkeypatch.setattr(gan_module, "generator_loss", nan_from_step_25)
    config = tiny_config()
    config.gan.checkpoint_every = 10
    with pytest.raises(LatentlabError, match=r"diverged at step 25 .*from step 20"):
        Pipeline(run, config).run_stage("gan")
    assert torch.load(run.checkpoints / "gan.pt", weights_only=True)["step"] == 20
    gan = load_gan(run, conditional=False)
    assert all(torch.isfinite(p).all() for p in gan.generator.parameters())
    images = sample_images(gan, load_decoder(run), 4, seed=0)
    assert images.shape == (4, 28, 28)
    assert run.metrics()["gan"]["diverged"] is True and run.metrics()["gan"]["diverged_at"] == 25
