"""Settings as dataclasses: one per stage, gathered in `Config`. config.json is `asdict(Config)`.

What each field accepts (type, range, and the limits the data sets) is in checks.FIELDS and RELATIONS,
printed by `latentlab run --help`; every setting is checked there before the first stage starts.
"""
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass


@dataclass
class AutoencoderConfig:
    latent_dim: int = 32      # size of the code every later stage works in
    width: int = 32           # channels of the first conv (the second has twice as many)
    epochs: int = 3           # 3 epochs of batch 64 at lr 4e-3 against 4 of 128 at 2e-3: 10% less time, and sharper
    batch_size: int = 64      # reconstructions in the judge's eyes (their Frechet distance 5.0-5.9 against 6.4-7.2 on
    lr: float = 4e-3          # three seeds), so every generator scored better (README); Adam, constant
    train_limit: int = 0      # use only the first N training images (0 = all 55,000); for tests


@dataclass
class ClassifierConfig:
    """The project's own digit classifier, used to judge generated images."""
    epochs: int = 3
    batch_size: int = 128
    lr: float = 5e-3          # peak of the one-cycle schedule (Adam)
    width: int = 16           # channels of the first conv block (then 2x and 4x)
    train_limit: int = 0      # use only the first N training images (0 = all 55,000); for tests
    seed: int = 0             # the judge's own seed and train/validation split, the same whatever the run's seed:
                              # runs of different seeds are scored with one yardstick (another judge alone moves
                              # a distance by a third or more: README, bench/bench_judges.py)
    shipped: bool = True      # on the shipped MNIST with the settings above at their defaults, take the judge
                              # shipped with latentlab (made by this stage: scripts/ship_judge.py) instead of
                              # training it (~50 s on 2 CPU cores); false: train it in the run


@dataclass
class FewshotConfig:
    labels_per_class: int = 5     # 5 x 10 digits = the reference's 50 labels
    draw: str = "balanced"        # "balanced" (5 per digit) or "random" (50 at random)
    draws: int = 10               # independent label draws, each with its own seed
    epochs: int = 200             # the reference MLP's epochs, in both regimes
    end_to_end_draws: int = 1     # other architectures than the reference's fine-tune on N draws (0 = every draw)
    curve_every: int = 20         # the reference MLP's validation-accuracy curves: a point every N epochs
    curve_images: int = 500       # ... on this fixed sample of validation images (the encoder makes it costly)
    neighbours: int = 10          # k of the kNN graph of training codes for Poisson learning
    balance: float = 0.75         # 0 = plain Poisson argmax, 1 = class sizes forced to the label frequencies
    deskew: bool = True           # also run the graph methods on codes of deskewed images (docs/fewshot_sweep.md)
    self_train_epochs: int = 0    # > 0: also a CNN on the deskewed training images, trained this many epochs on the
                                  # deskewed graph's labels of them (deskew_poisson_cnn); 3 epochs: +0.35 points, but
                                  # ~50 s per draw on one CPU thread, so off by default (docs/fewshot_sweep.md)
    train_limit: int = 0          # draw labels from, and build the graph on, the first N training images; for tests


@dataclass
class GANConfig:
    """Defaults are the plain GAN's, chosen by measurement (see gan.py); `cgan` changes a few."""
    steps: int = 12_000
    noise_dim: int = 64
    hidden: int = 256             # width of the two hidden layers of G and of D
    batch_size: int = 64          # small batches: more steps in the time budget, which helped more
    lr: float = 1e-3              # Adam, for G and D
    beta1: float = 0.0            # Adam's first-moment decay (beta2 0.999); 0: no momentum, as StyleGAN2 and
                                  # BigGAN train (0.5 before: Frechet distance GAN 33.6 -> 29.0, cGAN 9.48 -> 8.88;
                                  # docs/gan_sweep.md)
    loss: str = "nonsaturating"   # "nonsaturating" or "hinge"
    r1: float = 1.0               # R1 gradient penalty weight on real codes (0 = off)
    r1_every: int = 4             # apply it every this many steps (lazy regularisation)
    ema: float = 0.999            # keep an exponential moving average of G's weights (0 = the last step's G)
    checkpoint_every: int = 1000  # save the generator this often, so a divergence keeps the last good one
    log_every: int = 100          # loss history resolution (steps per recorded mean)


@dataclass
class FlowConfig:
    """The latent flow-matching generator (flow.py); defaults chosen by measurement (docs/flow_sweep.md)."""
    steps: int = 3000             # training steps
    batch_size: int = 256
    lr: float = 5e-3              # Adam, cosine decay to zero
    hidden: int = 256             # width of the MLP's hidden layers (the GANs' width)
    layers: int = 3               # residual blocks
    embed_dim: int = 64           # size of the time and the digit embeddings
    label_dropout: float = 0.5    # share of training codes shown as "no digit", so one net samples any digit too
    no_digit_target: str = "path"  # what "no digit" rows regress onto: the path's velocity x1 - x0, or "own_digit":
                                  # the field's own for the code's digit (no digit 31 -> 23, recall 0.72 -> 0.70,
                                  # a fifth slower to train; docs/flow_sweep.md)
    no_digit_sampling: str = "digit_mixture"  # samples with no digit asked for: "field" follows the "no digit"
                                  # field; "digit_mixture" the digits' own fields weighted by the net's guess of the
                                  # digit (a head trained on the "no digit" rows), from t = 0.3 on
    digit_loss_weight: float = 0.1  # the digit head's cross-entropy beside the velocity's squared error (1 cost the
                                  # digit samples: Frechet distance 6.0 -> 7.6, recall 0.68 -> 0.64)
    time_sampling: str = "logit_normal"  # training times: "uniform" in [0, 1], or sigmoid of a standard normal
    ema: float = 0.999            # keep an exponential moving average of the weights (0 = the last step's); its
                                  # decay warms up as (1 + step) / (10 + step), under 0.997 for all of 3000 steps, so
                                  # this cap binds only in longer runs (reaching 0.999 by step 2000 scored the same)
    guidance: float = 3.5         # classifier-free guidance scale for digit samples (1 = none, 0 = ignore digit)
    guidance_rescale: float = 1.0  # 0-1: how far the guided velocity is scaled back to the digit's own length
                                  # (1 with 2.5 against none with 1.5: Frechet distance 7.6 -> 6.3, recall 0.64 -> 0.67)
    guidance_reference: float = 0.5  # 0-1: from t = 0.3 guidance pushes away from this mix of the "no digit" field (0)
                                  # and the blend of the digits' fields (1) (0.5 at guidance 3.5 against 0 at 2.5, on
                                  # three flows: recall 0.694-0.696 -> 0.701-0.707; docs/flow_sweep.md)
    no_digit_temperature: float = 1.06  # the spread of the noise samples with no digit start from: the blend gathers
                                  # them a little too close to the digits' centres (1 -> 1.06 on three flows: recall
                                  # 0.686-0.714 -> 0.719-0.736, Frechet distance 8.1-10.8 -> 8.3-12.1; docs/flow_sweep.md)
    solver: str = "heun"          # fixed-step ODE solver: "euler", "midpoint" or "heun" (its last step euler's)
    ode_steps: int = 8            # solver steps from noise to code
    log_every: int = 100          # loss history resolution (steps per recorded mean)


@dataclass
class InterpolationConfig:
    pairs: int = 200
    steps: int = 10


@dataclass
class EvaluationConfig:
    samples: int = 10_000
    k: int = 3                    # neighbours for the precision/recall manifolds
    # Gaussian-mixture baselines (full covariance). Measured on validation log-likelihood: for all codes it
    # still rises at 80 components; per digit it peaks near 16. Sweeping at run time cost minutes, so fixed.
    gmm_components: int = 80
    gmm_components_per_digit: int = 16
    gmm_fit_limit: int = 20_000   # codes the all-digit mixture is fitted on (a seeded subset of the 55k)
    gmm_tol: float = 0.01         # EM stops when the mean log-likelihood gains less: 80 components on 20k codes
                                  # stop after 16 iterations instead of 54 (3x faster), validation -55.62 vs -55.60
    flow_sweep_samples: int = 1000  # flow samples per point of the ODE-steps / guidance sweep (at most `samples`)


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"          # "auto", "cpu" or "cuda"
    data_dir: str | None = None   # a folder of MNIST-format IDX files; None = the shipped MNIST
    quick: bool = False           # a smaller pipeline for a first look
    stage_workers: int = 0        # stages run side by side (the second in a child process): 0 = 2 where there are
                                  # 2+ CPU cores, else 1; 1 = one after another. Changes speed, not settings.
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    cgan: GANConfig = field(default_factory=lambda: GANConfig(steps=8_000, batch_size=128, loss="hinge", r1=0.0,
                                                                          ema=0.99))
    flow: FlowConfig = field(default_factory=FlowConfig)
    interpolation: InterpolationConfig = field(default_factory=InterpolationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


# What --quick changes: a pipeline for a first look (smaller slices, fewer epochs and steps). On the shipped
# MNIST the judge keeps its settings: the shipped judge costs nothing and scores every run with one yardstick.
QUICK = {
    "autoencoder": {"epochs": 1, "train_limit": 12_000},
    "classifier": {"epochs": 1, "train_limit": 8_000},
    "fewshot": {"draws": 2, "epochs": 30, "train_limit": 5_000, "end_to_end_draws": 1, "curve_every": 10},
    "gan": {"steps": 1000},
    "cgan": {"steps": 1000},
    "flow": {"steps": 300},
    "interpolation": {"pairs": 50},
    "evaluation": {"samples": 1000, "flow_sweep_samples": 200, "gmm_components": 10, "gmm_components_per_digit": 4,
                   "gmm_fit_limit": 3000},
}


def quick_shrinks_judge(config: Config) -> bool:
    """Whether --quick shrinks the judge: only where one is trained, on other data or with the shipped one off."""
    return config.quick and (config.data_dir is not None or not config.classifier.shipped)


def make_config(*, quick: bool = False, **top) -> Config:
    config = Config(quick=quick, **top)
    if quick:
        for section, changes in QUICK.items():
            if section == "classifier" and not quick_shrinks_judge(config):
                continue
            for key, value in changes.items():
                setattr(getattr(config, section), key, value)
    return config


def to_dict(config: Config) -> dict:
    return asdict(config)


def from_dict(values: dict) -> Config:
    """Rebuild a Config from config.json, ignoring keys it does not know (such as `environment`)."""
    def build(cls, data):
        kwargs = {}
        for f in fields(cls):
            if f.name in data:
                default = f.default_factory() if f.default_factory is not MISSING else None
                kwargs[f.name] = build(type(default), data[f.name]) if is_dataclass(default) else data[f.name]
        return cls(**kwargs)
    return build(Config, values)


def validate(config: Config) -> None:
    """Refuse settings no stage can use, naming the setting (as --set writes it): every field's type and range.

    The limits live in checks.FIELDS (printed by `latentlab run --help`); checks.check_config adds the data's.
    """
    from latentlab.checks import check_fields

    check_fields(config)
