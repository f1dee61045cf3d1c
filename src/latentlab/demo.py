"""The web demo (`latentlab demo --run DIR`): ask for a digit and see it; walk between two digits; by GAN or flow.

What the page does lives in plain functions over `DemoModels` (loaded once at start), which the tests call
directly; `build_app` only wires them into a Gradio page and `serve` runs it. Gradio is an optional extra
(`latentlab[demo]`) imported only inside those two, so the rest of latentlab never needs it.

Every visitor value goes through `whole_number` / `one_of` before use; file names of the downloads are made
from the validated numbers only, so nothing a visitor types becomes a path or code.
"""
import os

# Before Gradio is imported anywhere: no usage analytics or version checks leave this machine.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import base64  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import quote  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from latentlab import pixels  # noqa: E402
from latentlab.autoencoder import decode, encode, load_autoencoder  # noqa: E402
from latentlab.classifier import load_classifier, predict_proba  # noqa: E402
from latentlab.checks import config_from_json  # noqa: E402
from latentlab.context import Context  # noqa: E402
from latentlab.errors import LatentlabError  # noqa: E402
from latentlab import flow as latent_flow  # noqa: E402
from latentlab.gan import LatentGAN, generate_codes, load_gan, sample_images  # noqa: E402
from latentlab.interpolation import interpolate  # noqa: E402
from latentlab.runfolder import Run, atomic_write  # noqa: E402

MAX_COUNT = 64
MIN_STEPS, MAX_STEPS = 2, 20
MAX_SEED = 2**31 - 1
DIGIT_CHOICES = ["any"] + [str(d) for d in range(10)]
KINDS = ("linear", "spherical")
ENDPOINTS = ("two digits", "two test images")   # conditional GAN samples, or real test images through the AE
SCALE, GAP = 3, 2           # the grid draws each digit 3x larger (nearest pixel) with 2-pixel grey gaps
GAP_GREY = 90
CHECKPOINTS = ("autoencoder", "classifier", "gan", "cgan")   # and flow.pt, where the run has one
MODELS = ("GAN", "flow")    # which generator draws: the GANs, or the latent flow (guided to a digit, or no digit)


# ---- validation: every value from the page passes through one of these ----

def whole_number(value, name: str, low: int, high: int) -> int:
    """An int in [low, high] from an int, an integral float or a decimal string; anything else is refused."""
    if isinstance(value, bool):
        raise LatentlabError(f"{name}: expected a whole number, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.lstrip("-").isdigit()) or len(text) > 12:
            raise LatentlabError(f"{name}: expected a whole number, got {value[:20]!r}")
        value = int(text)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or value != int(value):
            raise LatentlabError(f"{name}: expected a whole number, got {value!r}")
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise LatentlabError(f"{name}: expected a whole number, got {type(value).__name__}")
    if not low <= value <= high:
        raise LatentlabError(f"{name}: {value} is outside {low}-{high}")
    return int(value)


def one_of(value, name: str, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise LatentlabError(f"{name}: choose one of {', '.join(options)}")
    return value


def chosen_model(models, value) -> str:
    """GAN or flow; the flow only where the run has one (runs from before it, or a stopped `latentlab run`)."""
    model = one_of(value, "model", MODELS)
    if model == "flow" and models.flow is None:
        raise LatentlabError(f"model flow: this run has no flow; train it with `latentlab train-flow --run "
                             f"{models.run.root}`")
    return model


def parse_digit(value, name: str = "digit", *, allow_any: bool = True) -> int | None:
    """'any' -> None (only where allowed); '0'-'9' or 0-9 -> that int."""
    if allow_any and value == "any":
        return None
    return whole_number(value, name, 0, 9)


# ---- the models, loaded once ----

@dataclass
class DemoModels:
    run: Run
    autoencoder: torch.nn.Module
    gan: LatentGAN              # plain: "any" digit
    cgan: LatentGAN             # conditional: the digit asked for
    flow: latent_flow.LatentFlow | None  # guided to the digit asked for, or no digit for "any"; None: none trained
    classifier: torch.nn.Module
    test_images: np.ndarray     # uint8 (N, 28, 28), ink 255
    test_labels: np.ndarray
    pca: PCA                    # fitted on the test codes, for the latent map
    test_points: np.ndarray     # (N, 2) the test codes in the map's plane
    metrics: dict
    downloads: Path             # folder of the PNG/NPZ files offered for download


def trained_run(run_dir) -> Run:
    """The run folder, if it holds every model the page needs; otherwise one error naming the command."""
    run = Run(run_dir)
    missing = [name for name in CHECKPOINTS if not (run.checkpoints / f"{name}.pt").is_file()]
    if missing:
        raise LatentlabError(f"{run.root}: no trained {', '.join(missing)} in this run folder; "
                             f"train it with `latentlab run --out {run.root}`")
    return run


def load_models(run_dir) -> DemoModels:
    """Load every model the page uses and project the test codes once."""
    run = trained_run(run_dir)
    ctx = Context(run=run, config=config_from_json(run.root / "config.json"))  # the run's own data, checked
    autoencoder = load_autoencoder(run)
    gan, cgan, classifier = load_gan(run, conditional=False), load_gan(run, conditional=True), load_classifier(run)
    codes = encode(autoencoder.encoder, ctx.images("test")).numpy()
    pca = PCA(n_components=2, svd_solver="full").fit(codes)  # deterministic, and fast on 10k codes
    return DemoModels(
        run=run, autoencoder=autoencoder, gan=gan, cgan=cgan, classifier=classifier,
        flow=latent_flow.load_flow(run) if (run.checkpoints / "flow.pt").is_file() else None,
        test_images=ctx.dataset.test_images, test_labels=ctx.dataset.test_labels, pca=pca,
        test_points=pca.transform(codes), metrics=run.metrics(),
        downloads=Path(tempfile.mkdtemp(prefix="latentlab-demo-")),
    )


# ---- Generate ----

def grid_shape(count: int) -> tuple[int, int]:
    """Rows and columns of the grid the page shows for `count` digits (at most 8 across)."""
    cols = min(count, 8)
    return math.ceil(count / cols), cols


def grid_picture(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> one uint8 picture: digits SCALE times larger, GAP grey pixels between them."""
    return pixels.grid(images, grid_shape(len(images))[1], pad=GAP, pad_value=GAP_GREY, scale=SCALE)


def cells_of(picture: np.ndarray, count: int) -> np.ndarray:
    """Undo `grid_picture`: the (count, 28, 28) digits back out of a shown grid (for tests reading the page)."""
    rows, cols = grid_shape(count)
    cell = 28 * SCALE
    out = []
    for i in range(count):
        r, c = divmod(i, cols)
        block = picture[r * (cell + GAP):r * (cell + GAP) + cell, c * (cell + GAP):c * (cell + GAP) + cell]
        out.append(block.reshape(28, SCALE, 28, SCALE).mean(axis=(1, 3)).round().astype(np.uint8))
    return np.stack(out)


def generate(models: DemoModels, digit, count, seed, model="GAN") -> dict:
    """Sample `count` digits as `latentlab sample --model gan|flow`: with the GAN a given digit from the conditional
    GAN and "any" from the plain one; with the flow, guided to the digit or with no digit.

    Returns images uint8 (N, 28, 28), labels (N,) (the digit asked for, or -1), the grid picture and their codes.
    """
    digit = parse_digit(digit)
    count = whole_number(count, "how many", 1, MAX_COUNT)
    seed = whole_number(seed, "seed", 0, MAX_SEED)
    model = chosen_model(models, model)
    if model == "flow":
        images = latent_flow.sample_images(models.flow, models.autoencoder.decoder, count, digit=digit, seed=seed)
    else:
        gan = models.gan if digit is None else models.cgan
        images = sample_images(gan, models.autoencoder.decoder, count, digit=digit, seed=seed)
    codes = encode(models.autoencoder.encoder, pixels.to_float(images))
    labels = np.full(count, -1 if digit is None else digit, dtype=np.int64)
    return {"images": images, "labels": labels, "picture": grid_picture(images), "codes": codes.numpy(),
            "digit": digit, "count": count, "seed": seed, "model": model}


_prune_lock = threading.Lock()


def save_downloads(models: DemoModels, result: dict, keep: int = 256) -> tuple[Path, Path]:
    """The grid as the PNG and the NPZ that `latentlab sample` writes; names come from validated numbers only."""
    name = f"digits-{'any' if result['digit'] is None else result['digit']}-n{result['count']}-seed{result['seed']}"
    name = "flow-" + name if result.get("model") == "flow" else name
    png, npz = models.downloads / f"{name}.png", models.downloads / f"{name}.npz"
    atomic_write(png, lambda f: pixels.write_grid_png(result["images"], f))
    atomic_write(npz, lambda f: np.savez(f, images=result["images"], labels=result["labels"]))
    with _prune_lock:  # keep the folder bounded however many visitors ask
        files = sorted(models.downloads.glob("digits-*"), key=lambda p: p.stat().st_mtime)
        for old in files[:-keep]:
            old.unlink(missing_ok=True)
    return png, npz


# ---- Interpolate ----

def interpolate_row(models: DemoModels, endpoints, first, second, steps, kind, seed, model="GAN") -> dict:
    """Walk between two codes and decode each step; the classifier reads every image.

    endpoints "two digits": samples of digits `first` and `second` by `model` (the conditional GAN or the flow);
    "two test images": two test images drawn by `seed`, through the autoencoder.
    Returns images uint8 (steps, 28, 28), readings [(digit, confidence)], the codes and a description.
    """
    endpoints = one_of(endpoints, "endpoints", ENDPOINTS)
    steps = whole_number(steps, "steps", MIN_STEPS, MAX_STEPS)
    kind = one_of(kind, "interpolation", KINDS)
    seed = whole_number(seed, "seed", 0, MAX_SEED)
    model = chosen_model(models, model)
    if endpoints == "two digits":
        a, b = parse_digit(first, "first digit", allow_any=False), parse_digit(second, "second digit", allow_any=False)
        if model == "flow":
            noise = latent_flow.draw_noise(2, models.flow.latent_dim, seed)
            ends = latent_flow.generate_codes(models.flow, noise, torch.tensor([a, b]))
            about = f"the latent flow: a {a} and a {b} (seed {seed})"
        else:
            noise = torch.randn(2, models.cgan.noise_dim, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                ends = generate_codes(models.cgan, noise, torch.tensor([a, b]))
            about = f"conditional GAN: a {a} and a {b} (seed {seed})"
    else:
        i, j = np.random.default_rng(seed).choice(len(models.test_images), 2, replace=False)
        pair = pixels.to_float(models.test_images[[i, j]])
        ends = encode(models.autoencoder.encoder, pair)
        about = (f"test image #{i} (a {models.test_labels[i]}) and test image #{j} (a {models.test_labels[j]}), "
                 "through the autoencoder")
    # walk in the codes standardised as the GANs see them: centred, so a spherical path is meaningful
    stats = models.cgan.stats
    standard = stats.standardise(ends)
    codes = stats.restore(interpolate(standard[0], standard[1], steps, kind))
    images = pixels.to_uint8(decode(models.autoencoder.decoder, codes))
    proba = predict_proba(models.classifier, images)
    readings = [(int(p.argmax()), float(p.max())) for p in proba]
    return {"images": images, "readings": readings, "codes": codes.numpy(),
            "about": f"{kind} path in the autoencoder's latent space between {about}"}


def png_data_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def walk_html(row: dict) -> str:
    """The walk as one row of images, each captioned with the classifier's reading (built from numbers only)."""
    cells = []
    for step, (image, (digit, confidence)) in enumerate(zip(row["images"], row["readings"])):
        cells.append(
            f'<figure class="step" style="margin:0;text-align:center">'
            f'<img src="{png_data_url(image)}" width="64" height="64" alt="step {step + 1}" '
            f'style="image-rendering:pixelated;display:block">'
            f'<figcaption class="reading" data-digit="{digit}" data-confidence="{confidence:.4f}" '
            f'style="font-size:13px">{digit} ({confidence:.0%})</figcaption></figure>')
    return ('<div class="walk" style="display:flex;flex-wrap:wrap;gap:8px">' + "".join(cells) + "</div>")


# ---- Latent map ----

def latent_map(models: DemoModels, codes=None, *, path: bool = False) -> np.ndarray:
    """RGB picture: the test codes on their first two principal axes, coloured by digit; `codes` drawn on top
    (joined by a line when `path`)."""
    fig = Figure(figsize=(5.2, 4.4), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = models.test_points
    scatter = ax.scatter(points[:, 0], points[:, 1], c=models.test_labels, cmap="tab10", vmin=-0.5, vmax=9.5,
                         s=2, alpha=0.5, linewidths=0, rasterized=True)
    fig.colorbar(scatter, ax=ax, ticks=range(10), label="digit (test set)")
    if codes is not None and len(codes):
        shown = models.pca.transform(np.asarray(codes, dtype=np.float64).reshape(len(codes), -1))
        if path:
            ax.plot(shown[:, 0], shown[:, 1], "-", color="black", lw=1)
        ax.scatter(shown[:, 0], shown[:, 1], marker="*", s=90, c="white", edgecolors="black", linewidths=0.8,
                   zorder=3, label="current walk" if path else "current samples")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("first principal axis of the codes")
    ax.set_ylabel("second principal axis")
    ax.set_title("latent map: test-set codes (PCA)", fontsize=10)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# ---- About this run ----

def _number(metrics: dict, *keys):
    value = metrics
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def headline_numbers(metrics: dict) -> list[tuple[str, str]]:
    """(label, formatted value) of the run's headline numbers from metrics.json; "not measured" where absent."""
    fewshot = metrics.get("fewshot", {})
    best = fewshot.get("best_method")
    rows = [
        ("autoencoder test error (MSE per pixel)", _number(metrics, "autoencoder", "test_mse"), "{:.5f}"),
        (f"few-label test accuracy ({fewshot.get('labels')} labels, {best}; mean over draws)" if best else
         "few-label test accuracy (best method; mean over draws)",
         _number(fewshot, "methods", best, "test_accuracy", "mean") if best else None, "{:.1%}"),
        ("conditional GAN: samples read as the digit asked for", _number(metrics, "cgan", "quality", "accuracy"),
         "{:.1%}"),
        ("Frechet distance, latent GAN (classifier features)", _number(metrics, "gan", "quality", "frechet_distance"),
         "{:.2f}"),
        ("Frechet distance, conditional latent GAN", _number(metrics, "cgan", "quality", "frechet_distance"),
         "{:.2f}"),
        ("latent flow: samples read as the digit asked for", _number(metrics, "flow", "quality", "accuracy"),
         "{:.1%}"),
        ("Frechet distance, latent flow with a digit", _number(metrics, "flow", "quality", "frechet_distance"),
         "{:.2f}"),
        ("the judging classifier's test accuracy", _number(metrics, "classifier", "test_accuracy"), "{:.2%}"),
    ]
    return [(label, "not measured" if value is None else fmt.format(value)) for label, value, fmt in rows]


def about_markdown(models: DemoModels, report_url: str | None) -> str:
    lines = [f"**Run:** `{models.run.root.resolve().name}`", "", "| number | value |", "| --- | --- |"]
    lines += [f"| {label} | {value} |" for label, value in headline_numbers(models.metrics)]
    lines.append("")
    lines.append(f"[Open the full report]({report_url})" if report_url else
                 "No report yet: `latentlab run` writes report.html at its end.")
    return "\n".join(lines)


# ---- the page ----

def _theme():
    import gradio as gr

    # System fonts only: the default themes fetch web fonts from Google, and the demo must work offline.
    return gr.themes.Base(font=["system-ui", "Helvetica", "Arial", "sans-serif"],
                          font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])


def build_app(models: DemoModels):
    """The Gradio page over the functions above; a bad value shows as a one-line error on the page."""
    import gradio as gr

    def guarded(fn):
        def run(*args):
            try:
                return fn(*args)
            except LatentlabError as e:
                raise gr.Error(str(e)) from None
        return run

    def on_generate(digit, count, seed, model):
        result = generate(models, digit, count, seed, model)
        png, npz = save_downloads(models, result)
        return result["picture"], str(png), str(npz), result["codes"]

    def on_interpolate(endpoints, first, second, steps, kind, seed, model):
        row = interpolate_row(models, endpoints, first, second, steps, kind, seed, model)
        return walk_html(row), row["about"], row["codes"]

    report = models.run.root / "report.html"
    report_url = f"/gradio_api/file={quote(str(report.resolve()))}" if report.is_file() else None
    with gr.Blocks(title="latentlab demo", analytics_enabled=False, delete_cache=(600, 1800)) as app:
        gr.Markdown("# latentlab: digits from an autoencoder's latent space\n"
                    "Ask for a digit and see it written by a GAN or a flow-matching model trained on the "
                    "autoencoder's codes, or walk between two digits.")
        codes = gr.State(None)
        path_codes = gr.State(None)
        with gr.Tab("Generate"):
            with gr.Row():
                digit = gr.Dropdown(DIGIT_CHOICES, value="3", label="digit", elem_id="digit")
                count = gr.Slider(1, MAX_COUNT, value=16, step=1, label="how many", elem_id="count")
                seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed", elem_id="seed")
                model = gr.Radio(list(MODELS), value=MODELS[0], label="model", elem_id="model")
            generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
            grid = gr.Image(label="generated digits", format="png", image_mode="L", interactive=False,
                            elem_id="grid", buttons=["download"])
            with gr.Row():
                png_file = gr.File(label="grid as PNG", elem_id="png-file")
                npz_file = gr.File(label="images as NPZ (as latentlab sample writes them)", elem_id="npz-file")
        with gr.Tab("Interpolate"):
            with gr.Row():
                endpoints = gr.Radio(list(ENDPOINTS), value=ENDPOINTS[0], label="endpoints", elem_id="endpoints")
                first = gr.Dropdown(DIGIT_CHOICES[1:], value="3", label="first digit", elem_id="first")
                second = gr.Dropdown(DIGIT_CHOICES[1:], value="8", label="second digit", elem_id="second")
            with gr.Row():
                steps = gr.Slider(MIN_STEPS, MAX_STEPS, value=10, step=1, label="steps", elem_id="steps")
                kind = gr.Radio(list(KINDS), value="linear", label="interpolation", elem_id="kind")
                walk_seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed", elem_id="walk-seed")
                walk_model = gr.Radio(list(MODELS), value=MODELS[0], label="model", elem_id="walk-model")
            walk_button = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
            # the digit choices and the model matter only for generated endpoints
            endpoints.change(lambda e: [gr.Dropdown(interactive=e == ENDPOINTS[0])] * 2
                             + [gr.Radio(interactive=e == ENDPOINTS[0])], [endpoints], [first, second, walk_model],
                             api_name=False)
            walk_about = gr.Markdown()
            gr.Markdown("Under each image: the digit the project's classifier reads, and its confidence.")
            row = gr.HTML(elem_id="walk")
        with gr.Tab("Latent map"):
            gr.Markdown("The test set's codes on their first two principal axes; stars are the current "
                        "samples (the last Generate) or the last walk (Interpolate).")
            latent = gr.Image(value=latent_map(models), label="latent map", format="png", interactive=False,
                              elem_id="latent-map", buttons=["download", "fullscreen"])
        with gr.Tab("About this run"):
            gr.Markdown(about_markdown(models, report_url), elem_id="about")

        generate_button.click(guarded(on_generate), [digit, count, seed, model], [grid, png_file, npz_file, codes],
                              api_name="generate").then(
            lambda c: latent_map(models, c), [codes], [latent], api_name=False)
        walk_button.click(guarded(on_interpolate), [endpoints, first, second, steps, kind, walk_seed, walk_model],
                          [row, walk_about, path_codes], api_name="interpolate").then(
            lambda c: latent_map(models, c, path=True), [path_codes], [latent], api_name=False)
    return app


def check_address(host: str, port: int) -> None:
    """Fail in a second, before the models load, when host:port cannot be listened on."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise LatentlabError(f"--host {host}: not an address to listen on ({e.strerror})") from None
    except UnicodeError:  # a name the resolver cannot even encode: an empty or over-long label
        raise LatentlabError(f"--host {host}: not an address to listen on (not a valid host name)") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself will
        try:
            probe.bind(address)
        except OSError as e:
            raise LatentlabError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def serve(run_dir, host: str = "127.0.0.1", port: int = 7860, *, threads: int = 1) -> None:
    """Load the models, start the page on host:port, print its address and serve until interrupted."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise LatentlabError("the demo needs Gradio: install latentlab[demo] (pip install 'latentlab[demo]')")
    trained_run(run_dir)
    check_address(host, port)
    torch.set_num_threads(threads)  # requests run two at a time (the queue below), one core each
    models = load_models(run_dir)
    try:
        app = build_app(models)
        app.queue(default_concurrency_limit=2, max_size=64)
        report = models.run.root / "report.html"
        try:
            app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                       show_error=True, footer_links=[], run_history=False, ssr_mode=False, mcp_server=False,
                       pwa=False, enable_monitoring=False, max_file_size="1mb", theme=_theme(),
                       allowed_paths=[str(report.resolve())])  # the report is self-contained; nothing else is served
        except OSError as e:
            raise LatentlabError(f"--host {host} --port {port}: cannot listen there ({e})") from None
        address = f"[{host}]" if ":" in host else host
        print(f"latentlab: demo of {models.run.root} running at http://{address}:{port}/ (Ctrl+C stops it)",
              flush=True)
        app.block_thread()
    finally:
        shutil.rmtree(models.downloads, ignore_errors=True)
