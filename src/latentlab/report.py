"""The report: DIR/report.md and a self-contained DIR/report.html, written only from metrics.json and config.json
(and stages.json, for which stages were taken from another run).

Every number printed here is read from the run's metrics.json or config.json; the only numbers typed in
are the reference report's own figures, labelled as such.
"""
import base64
import json
import re
from pathlib import Path

from latentlab.checks import read_stages
from latentlab.context import Context
from latentlab.errors import LatentlabError
from latentlab.fewshot import REFERENCE  # the reference report's own results: quoted, not measured here
from latentlab.flow import MIXTURE_FROM, rescaled
from latentlab.runfolder import read_json, write_text


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _figures(root: Path, *names: str) -> str:
    """Markdown image lines for the figures that exist, in the order given (globs allowed)."""
    lines = []
    for pattern in names:
        for path in sorted((root / "figures").glob(pattern)):
            lines.append(f"![{path.stem.replace('_', ' ')}](figures/{path.name})")
    return "\n\n".join(lines)


def words(config: dict) -> dict:
    """The dataset's name and what to call its images and classes: digits only for MNIST."""
    from latentlab.data import dataset_name

    name = dataset_name(config.get("data_dir"))
    mnist = name == "MNIST"
    return {"name": name, "mnist": mnist, "images": "digits" if mnist else "images",
            "class": "digit" if mnist else "class"}


def in_words(text: str, w: dict) -> str:
    """Text in the dataset's words: the stages and metric names say "digit", which only MNIST's classes are.
    Figure paths (`](figures/...)`) stay as the files are named."""
    if w["mnist"]:
        return text
    pieces = re.split(r"(\]\(figures/[^)]*\))", text)
    for i in range(0, len(pieces), 2):  # the even pieces are text, the odd ones figure paths
        for old, new in (("digit-like", "like real images"), ("digits", "images"), ("digit", "class")):
            pieces[i] = pieces[i].replace(old, new)
    return "".join(pieces)


def autoencoder_section(m: dict, root: Path, w: dict) -> str:
    ae = m.get("autoencoder")
    if not ae:
        return ""
    return "\n\n".join([
        "## Autoencoder",
        f"A convolutional autoencoder with a {ae['latent_dim']}-dimensional code, trained for {ae['epochs']} epochs on "
        f"{ae['train_images']} images, reconstructs the test {w['images']} with a mean squared error of "
        f"**{num(ae['test_mse'], 5)} per pixel** (pixels in [0, 1]; binary cross-entropy {num(ae['test_bce'], 4)}).",
        _figures(root, "ae_reconstructions.png", "ae_losses.png"),
    ])


def fewshot_section(m: dict, root: Path, w: dict) -> str:
    fs = m.get("fewshot")
    if not fs:
        return ""
    methods = fs["methods"]
    parts = ["## Few-label classification",
             f"{fs['labels']} labelled training images ({fs['draw']} draw), {fs['draws']} independent draws; "
             "accuracy on the test set: mean ± standard deviation over the draws, and the worst draw."]
    rows = []
    for name, ref in REFERENCE.items():
        if name in methods and w["mnist"]:  # the reference figures are MNIST's: no comparison for other data
            acc = methods[name]["test_accuracy"]
            rows.append([f"`{name}`", f"{pct(ref)} (reference report)",
                         f"{pct(acc['mean'])} ± {pct(acc['std'])}", pct(acc["min"])])
    if rows:
        parts.append(_table(["regime of the reference MLP", "reference report", "latentlab", "worst draw"], rows))
    ranked = sorted(methods.items(), key=lambda kv: -kv[1]["test_accuracy"]["mean"])
    rows = [[f"`{name}`" + (" **(headline)**" if name == fs.get("best_method") else ""),
             "transductive" if info.get("transductive") else "inductive",
             pct(info["test_accuracy"]["mean"]), pct(info["test_accuracy"]["std"]), pct(info["test_accuracy"]["min"])]
            for name, info in ranked]
    parts.append(_table(["method", "test images in the graph?", "mean", "std", "worst draw"], rows))
    ablation = [a for a in fs.get("ablation", []) if a["method"] in methods]
    if ablation:
        parts.append("Ablation: each ingredient added in turn (test accuracy over the draws; seconds: what the "
                     "ingredient adds to the stage, all draws together).")
        parts.append(_table(["ingredient", "method", "mean", "worst draw", "seconds"], [
            [a["step"], f"`{a['method']}`", pct(methods[a["method"]]["test_accuracy"]["mean"]),
             pct(methods[a["method"]]["test_accuracy"]["min"]), num(a["seconds"], 1)] for a in ablation]))
    if fs.get("note"):
        parts.append(fs["note"])
    parts.append(_figures(root, "fewshot_*.png"))
    return "\n\n".join(parts)


def _quality_row(name: str, q: dict, train_seconds=None) -> list[str]:
    return [name, num(q.get("frechet_distance"), 2), num(q.get("precision")), num(q.get("recall")),
            pct(q["accuracy"]) if q.get("accuracy") is not None else "-",
            num(train_seconds, 1) if train_seconds is not None else "-"]


def judge_sentence(judge: dict) -> str:
    """Which classifier judged: the one shipped with latentlab (the same for every run of the shipped MNIST) or
    the run's own."""
    if "test_accuracy" not in judge:
        return ""
    made = judge.get("shipped")
    where = (f"the one shipped with latentlab (trained by this stage at commit {str(made.get('git_commit'))[:7]}, "
             "the same for every run with its settings on the shipped data)" if made else "trained in this run")
    return f" The classifier is {where}; test accuracy {100 * judge['test_accuracy']:.2f}%."


def generation_section(m: dict, root: Path, w: dict) -> str:
    if "gan" not in m and "cgan" not in m:
        return ""
    parts = ["## Generation in the latent space",
             "A generator maps Gaussian noise to codes and the decoder turns codes into images; the conditional "
             f"generator also takes the {w['class']}. Quality is measured with latentlab's own classifier on "
             f"{m.get('evaluation', {}).get('samples', 'n/a')} samples per model: the share read as the {w['class']} "
             "asked for, the Fréchet distance between classifier features of generated and test images, and k-NN "
             "precision/recall in the same space." + judge_sentence(m.get("classifier", {}))]
    parts.append(_figures(root, "gan_samples.png", "cgan_samples.png", "flow_samples.png"))
    ev = m.get("evaluation")
    if ev:
        floors = ev.get("floors", {})
        rows = [["real training images (floor)", num(floors.get("train_vs_test_frechet_distance"), 2),
                 num(floors.get("train_vs_test_precision")), num(floors.get("train_vs_test_recall")), "-", "-"],
                ["AE reconstructions of test images (floor)", num(floors.get("reconstruction_frechet_distance"), 2),
                 num(floors.get("reconstruction_precision")), num(floors.get("reconstruction_recall")),
                 pct(floors["reconstruction_accuracy"]) if "reconstruction_accuracy" in floors else "-", "-"],
                ["AE reconstructions of training images (exact codes)",
                 num(floors.get("train_reconstruction_frechet_distance"), 2),
                 num(floors.get("train_reconstruction_precision")), num(floors.get("train_reconstruction_recall")),
                 "-", "-"]]
        for key, quality, label in (("gan", "quality", "latent GAN"), ("cgan", "quality", "conditional latent GAN"),
                                    ("flow", "quality_unconditional", "latent flow, no digit"),
                                    ("flow", "quality", "latent flow, with a digit")):
            if quality in m.get(key, {}):
                rows.append(_quality_row(label, m[key][quality], m[key].get("train_seconds")))
        for key, q in m.get("baselines", {}).items():
            rows.append(_quality_row(f"Gaussian mixture `{key}` (baseline)", q))
        parts.append("Every generator and baseline side by side (training seconds on this run's machine):")
        parts.append(_table(["model", "Fréchet distance", "precision", "recall", "read as asked", "training s"], rows))
        cq = m.get("cgan", {}).get("quality")
        if cq and "accuracy_per_digit" in cq:
            digits = sorted(cq["accuracy_per_digit"])
            parts.append(f"Conditional accuracy per {w['class']}:\n\n" + _table(
                [w["class"]] + digits, [["read as asked"] + [pct(cq["accuracy_per_digit"][d]) for d in digits]]))
        gq = m.get("gan", {}).get("quality")
        if gq and "class_histogram" in gq:
            parts.append(f"{w['class'].capitalize()} read in the plain GAN's samples (mode collapse would show as "
                         "a skew):\n\n" + _table([w["class"]] + [str(d) for d in range(10)], [["share"] + [pct(v) for v in gq["class_histogram"]]]))
        if ev.get("verdict"):
            parts.append(f"**Verdict.** {ev['verdict']}")
        if ev.get("targets"):
            parts.append("Targets: " + ", ".join(f"{name} {'met' if met else '**not met**'}"
                                                 for name, met in ev["targets"].items()) + ".")
        parts.append(flow_part(m.get("flow", {}), root))
    parts.append(_figures(root, "evaluation_*.png", "baseline_*.png", "gan_losses.png", "cgan_losses.png"))
    return "\n\n".join(p for p in parts if p)


def flow_part(flow: dict, root: Path) -> str:
    """The flow against the GANs: its verdict, targets, and Frechet distance by ODE steps and guidance."""
    if "quality" not in flow:
        return ""
    parts = [f"**Latent flow matching** ({flow.get('solver')}, {flow.get('ode_steps')} ODE steps, guidance "
             f"{flow.get('guidance')}{rescaled(flow.get('guidance_rescale', 0))}, "
             f"{flow.get('steps')} training steps)."]
    if flow.get("no_digit_sampling") == "digit_mixture":
        parts[0] += (f" Samples with no digit follow, from t = {MIXTURE_FROM:g} on, the digits' own fields weighted by the "
                     "network's guess of the digit (`flow.no_digit_sampling=digit_mixture`).")
    if flow.get("no_digit_temperature", 1) != 1:
        parts[0] += f" They start from noise of spread {flow['no_digit_temperature']:g} (`flow.no_digit_temperature`)."
    if flow.get("verdict"):
        parts.append(f"**Verdict (flow against the GANs).** {flow['verdict']}")
    if flow.get("targets"):
        parts.append("Flow targets: " + ", ".join(f"{name} {'met' if met else '**not met**'}"
                                                  for name, met in flow["targets"].items()) + ".")
    hist = flow.get("quality_unconditional", {}).get("class_histogram")
    if hist:
        parts.append("Digits read in the flow's samples with no digit asked for:\n\n" + _table(
            ["digit"] + [str(d) for d in range(10)], [["share"] + [pct(v) for v in hist]]))
    sweep = flow.get("sweep")
    if sweep:
        for key, label in (("by_ode_steps", "ODE steps"), ("by_guidance", "guidance scale")):
            values = sweep[key]
            parts.append(f"Digit samples ({sweep['samples']} per point) by {label}:\n\n" + _table(
                [label] + list(values), [["Fréchet distance"] + [num(v["frechet_distance"], 2) for v in values.values()],
                                         ["read as asked"] + [pct(v["accuracy"]) for v in values.values()]]))
    parts.append(_figures(root, "flow_sweep.png", "flow_losses.png"))
    return "\n\n".join(p for p in parts if p)


def interpolation_section(m: dict, root: Path, w: dict) -> str:
    it = m.get("interpolation")
    if not it:
        return ""
    kinds = [k for k, v in it.items() if isinstance(v, dict)]
    keys = sorted({key for k in kinds for key, v in it[k].items() if isinstance(v, (int, float))})
    rows = [[k] + [num(it[k].get(key)) for key in keys] for k in kinds]
    parts = ["## Interpolation",
             f"The reference report (on MNIST) judged paths between two GAN samples more digit-like than paths "
             f"between two real images through the autoencoder. Measured here{'' if w['mnist'] else ' on ' + w['name']} "
             "over random pairs, by the classifier's confidence along the path:",
             _figures(root, "interpolation*.png"),
             _table(["path"] + keys, rows)]
    if it.get("verdict"):
        parts.append(f"**Verdict.** {it['verdict']}")
    return "\n\n".join(parts)


def timeline(stages: dict) -> list[tuple[str, str, float, float]]:
    """The stages the last command made (not those taken from another run) as (lane, stage, start, seconds),
    start in seconds since that command's pipeline began; empty for records without times (runs before they were kept)."""
    from datetime import datetime

    def seconds(r) -> bool:
        x = r.get("seconds")
        return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < float("inf")

    made = {name: r for name, r in stages.items() if not r.get("reused_from") and seconds(r)
            and all(isinstance(r.get(k), str) for k in ("started", "invocation"))}
    if not made:
        return []
    last = max(r["invocation"] for r in made.values())
    try:
        began = datetime.fromisoformat(last)
        bars = [("beside" if r.get("beside") else "this process", name,
                 (datetime.fromisoformat(r["started"]) - began).total_seconds(), float(r["seconds"]))
                for name, r in made.items() if r["invocation"] == last]
    except (ValueError, TypeError):  # a hand-edited time: the table still has the seconds
        return []
    return sorted(bars, key=lambda bar: bar[2])


def settings_section(m: dict, config: dict, w: dict, stages: dict, root: Path) -> str:
    env = config.get("environment", {})
    timings = m.get("timings_s", {})
    taken = {name: r["reused_from"] for name, r in stages.items() if r.get("reused_from")}
    rows = [[stage, num(seconds, 1) + (f" (taken from {taken[stage]}, same settings)" if stage in taken else "")]
            for stage, seconds in timings.items()]
    settings = {k: v for k, v in config.items() if k != "environment"}
    return "\n\n".join([
        "## Settings, versions and timings",
        f"Seed {config.get('seed')}; data: {w['name']} ({config.get('data_dir') or 'shipped with latentlab'}); "
        f"latentlab {env.get('latentlab')}, torch {env.get('torch')}, Python {env.get('python')}, "
        f"commit {env.get('git_commit') or 'unknown'}.",
        _table(["stage", "wall seconds"], rows),
        _figures(root, "timeline.png"),
        "<details><summary>every setting (config.json)</summary>\n\n```json\n"
        + json.dumps(settings, indent=1) + "\n```\n\n</details>",
    ])


def markdown_report(metrics: dict, config: dict, stages: dict, root: Path) -> str:
    w = words(config)
    parts = [f"# latentlab report: {w['name']}"]
    if config.get("quick"):
        parts.append("> **Quick run (`--quick`)**: small settings for a first look. These numbers are not the "
                     "study's; run without `--quick` for them.")
    for name, section in (("autoencoder", autoencoder_section), ("fewshot", fewshot_section),
                          ("gan", generation_section), ("interpolation", interpolation_section)):
        try:  # metrics.json's sections are objects (checked on read); a field missing or of a wrong type inside:
            text = section(metrics, root, w)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            raise LatentlabError(f"{root / 'metrics.json'}: the {name} section is damaged "
                                 f"({type(e).__name__}: {' '.join(str(e).split())[:80]})") from None
        if text:
            parts.append(in_words(text, w))  # tables, target names and figure captions too
    parts.append(settings_section(metrics, config, w, stages, root))
    return "\n\n".join(parts) + "\n"


def html_report(markdown_text: str, root: Path) -> str:
    """The same report as one HTML file, figures embedded as data URIs, so it opens anywhere offline."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables", "fenced_code", "md_in_html"])

    def embed(match):
        path = root / match.group(1)
        data = base64.b64encode(path.read_bytes()).decode() if path.is_file() else ""
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="(figures/[^"]+\.png)"', embed, body)
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%}blockquote{background:#fff4d6;"
             "margin:0;padding:.5em 1em}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>latentlab report</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")


def write_report(root: Path) -> tuple[Path, Path]:
    root = Path(root)
    from latentlab.checks import config_from_json, read_metrics

    metrics = read_metrics(root / "metrics.json")
    config_from_json(root / "config.json")  # checked; the report prints the file's own values
    config = read_json(root / "config.json")
    # which stages were taken from another run (--reuse, a sweep's trials), and when each ran; missing: the timings
    # alone, no timeline; damaged: refused in one line, as every command refuses it, before anything is written
    stages = read_stages(root / "stages.json") if (root / "stages.json").exists() else {}
    bars = timeline(stages)
    if bars:
        from latentlab import figures

        figures.stage_timeline(bars, root / "figures" / "timeline.png",
                               title="where the last command's time went: each stage on its process")
    text = markdown_report(metrics, config, stages, root)
    write_text(root / "report.md", text)
    write_text(root / "report.html", html_report(text, root))
    return root / "report.md", root / "report.html"


def stage(ctx: Context) -> dict:
    md, html = write_report(ctx.run.root)
    return {"report": {"markdown": md.name, "html": html.name}}
