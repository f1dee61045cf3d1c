"""Where a GPU run's seconds go, for choosing what to change (needs a GPU):

    python bench/profile_cuda.py steps             # ms per training step of the AE, the classifier and a GAN, by variant
    python bench/profile_cuda.py stages RUN_DIR    # cProfile of the fewshot and baselines stages on a trained run

Variants of a conv net's step: as the pipeline runs it; cuDNN's autotuner on; the default memory layout
instead of channels-last; the whole step as one CUDA graph; bf16 autocast. Timed over 200 steps after 20
warm-up steps, synchronised.
"""
import cProfile
import io
import os
import pstats
import sys
import time

os.environ.setdefault("SCIPY_ARRAY_API", "1")

import torch
import torch.nn.functional as F

from latentlab.models import Autoencoder, DigitClassifier, adam, capture_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a check of this script


def time_steps(step, static, count: int = 200, graph: bool = False, optimizers=()) -> float:
    """ms per step of `step(*static)`."""
    for _ in range(20):
        step(*static)
    replay = capture_step(step, optimizers, *static).replay if graph else (lambda: step(*static))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / count * 1000


def conv_steps():
    images = torch.rand(10_000, 1, 28, 28, device=DEVICE)
    labels = torch.randint(10, (10_000,), device=DEVICE)
    index = torch.randint(10_000, (128,), device=DEVICE)
    for name, build, loss_of in (
            ("autoencoder", lambda: Autoencoder(latent_dim=32, width=32),
             lambda m, x, y: F.binary_cross_entropy_with_logits(m.decoder.logits(m.encoder(x)), x)),
            ("classifier", lambda: DigitClassifier(width=16),
             lambda m, x, y: F.cross_entropy(m(x), y))):
        results = {}
        for variant in ("as run", "cudnn.benchmark", "benchmark+contiguous", "benchmark+graph",
                        "benchmark+bf16", "benchmark+contiguous+graph"):
            torch.backends.cudnn.benchmark = "benchmark" in variant
            torch.manual_seed(0)
            model = build().to(DEVICE)
            if "contiguous" in variant:
                model = model.to(memory_format=torch.contiguous_format)
            graph = "graph" in variant
            optimizer = adam(model.parameters(), lr=1e-3, capturable=graph)

            def step(index):
                x, y = images[index], labels[index]
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled="bf16" in variant):
                    loss = loss_of(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            try:
                results[variant] = f"{time_steps(step, (index,), graph=graph, optimizers=[optimizer]):.3f}"
            except Exception as e:
                results[variant] = f"failed: {type(e).__name__}: {str(e)[:80]}"
        print(f"{name} ms/step (batch 128):", results, flush=True)
    torch.backends.cudnn.benchmark = False


def gan_steps():
    import latentlab.gan as gan
    from latentlab.config import GANConfig

    codes = torch.randn(20_000, 32, device=DEVICE)
    labels = torch.randint(10, (20_000,), device=DEVICE)
    cfg = GANConfig(steps=3000, checkpoint_every=100_000, log_every=1000, batch_size=128)
    original = gan.adam
    for name, optimizer in (("foreach", original),
                            ("fused", lambda params, device, **o: torch.optim.Adam(params, fused=True, **o))):
        gan.adam = optimizer
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            gan.train_gan(cfg, codes, labels, seed=0)
            torch.cuda.synchronize()
            print(f"cGAN-shaped steps with {name} Adam: {cfg.steps / (time.perf_counter() - start):,.0f} steps/s",
                  flush=True)
        except Exception as e:
            print(f"cGAN with {name} Adam failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        finally:
            gan.adam = original


def stages(run_dir: str):
    from latentlab.config import from_dict
    from latentlab.context import Context
    from latentlab.pipeline import stage_function
    from latentlab.runfolder import Run, read_json

    run = Run(run_dir)
    ctx = Context(run=run, config=from_dict(read_json(run.root / "config.json")), device=DEVICE, threads=2)
    ctx.images("train"), ctx.codes("train")  # loaded before the clock, as a stage in a running pipeline finds them
    for name in ("fewshot", "baselines"):
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        stage_function(name)(ctx)
        torch.cuda.synchronize() if DEVICE.type == "cuda" else None
        profile.disable()
        print(f"\n== {name}: {time.perf_counter() - start:.1f} s", flush=True)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(22)
        print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["steps"]:
        conv_steps()
        gan_steps()
    elif sys.argv[1:2] == ["stages"]:
        stages(sys.argv[2])
    else:
        sys.exit(__doc__)
