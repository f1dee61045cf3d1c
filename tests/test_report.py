"""The report: both files written, quick runs flagged, and every number traceable to metrics.json/config.json."""
import json
import math
import re
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentlab.report import REFERENCE, timeline, write_report


def _leaves(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)  # keys too: a target's name such as "recall_at_least_0.5" is in metrics.json
            yield from _leaves(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


def _allowed_numbers(*sources) -> set[str]:
    """Every way the report may print a number that is in the sources."""
    allowed = {str(d) for d in range(10)}  # digit names (0-9) and the pixel range [0, 1]
    for value in [v for s in sources for v in _leaves(s)]:
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, str):
            allowed |= set(re.findall(r"\d+(?:\.\d+)?", value))
            continue
        allowed.add(str(value))
        for digits in range(6):
            allowed.add(f"{value:.{digits}f}")
            allowed.add(f"{100 * value:.{digits}f}")
    return allowed


def numbers_not_in_sources(text: str, metrics: dict, config: dict) -> list[str]:
    allowed = _allowed_numbers(metrics, config, REFERENCE)
    return [n for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", text) if n not in allowed]


FAKE_METRICS = {
    "autoencoder": {"test_mse": 0.004321, "test_bce": 0.07345, "latent_dim": 32, "train_images": 55000, "epochs": 4},
    "fewshot": {
        "labels": 50, "draws": 10, "draw": "balanced", "best_method": "spread",
        "methods": {
            "seed_mlp_frozen": {"test_accuracy": {"mean": 0.7712, "std": 0.0281, "min": 0.7233}, "per_draw": [0.7712]},
            "seed_mlp_end_to_end": {"test_accuracy": {"mean": 0.6911, "std": 0.0366, "min": 0.6152}, "per_draw": [0.6]},
            "spread": {"test_accuracy": {"mean": 0.9734, "std": 0.0047, "min": 0.9633}, "per_draw": [0.97],
                       "transductive": False},
        },
        "ablation": [{"step": "the labelled codes alone", "method": "seed_mlp_frozen", "seconds": 1.23},
                     {"step": "+ a graph of the unlabelled codes", "method": "spread", "seconds": 12.34},
                     {"step": "+ an ingredient this run skipped", "method": "absent", "seconds": 0.5}],
    },
    "gan": {"quality": {"frechet_distance": 3.4567, "precision": 0.8123, "recall": 0.6234,
                        "class_histogram": [0.11, 0.09, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]}},
    "cgan": {"quality": {"frechet_distance": 2.3456, "precision": 0.8456, "recall": 0.5567, "accuracy": 0.9923,
                         "accuracy_per_digit": {str(d): 0.98 + d / 1000 for d in range(10)}}},
    "baselines": {"gmm": {"frechet_distance": 4.5678, "precision": 0.7012, "recall": 0.6812}},
    "evaluation": {"samples": 10000, "floors": {"train_vs_test_frechet_distance": 0.4321,
                                                "reconstruction_frechet_distance": 1.9876},
                   "verdict": "The conditional GAN (2.35) beats the per-digit mixture (4.57)."},
    "interpolation": {"linear_noise": {"mean_confidence": 0.9312, "min_confidence": 0.7123},
                      "real_codes": {"mean_confidence": 0.8712, "min_confidence": 0.4512},
                      "verdict": "GAN paths are more digit-like (0.931 vs 0.871)."},
    "timings_s": {"autoencoder": 61.234, "total": 300.5},
}


@pytest.mark.parametrize("quick", [False, True])
def test_report_numbers_all_come_from_the_run(tmp_path, quick):
    config = {"seed": 3, "quick": quick, "autoencoder": {"epochs": 4}, "environment": {"torch": "2.13.0+cpu",
              "python": "3.11.7", "latentlab": "0.1.0", "git_commit": "0123456789abcdef"}}
    (tmp_path / "figures").mkdir()
    (tmp_path / "metrics.json").write_text(json.dumps(FAKE_METRICS))
    (tmp_path / "config.json").write_text(json.dumps(config))
    md, html = write_report(tmp_path)
    text = md.read_text()
    assert numbers_not_in_sources(text, FAKE_METRICS, config) == []
    assert "74.5%" in text and "60.7%" in text and "reference report" in text
    assert "97.3%" in text  # the headline method's mean
    ablation = text[text.index("Ablation"):]
    assert "| + a graph of the unlabelled codes | `spread` | 97.3% | 96.3% | 12.3 |" in ablation
    assert "skipped" not in ablation  # a step whose method did not run has no row
    assert ("Quick run" in text) == quick
    assert html.read_text().startswith("<!DOCTYPE html>") and "<table>" in html.read_text()


def test_checker_catches_a_number_typed_in():
    assert numbers_not_in_sources("accuracy 99.9%", FAKE_METRICS, {}) == ["99.9"]


def test_html_embeds_figures(tmp_path, tiny_run):
    shutil.copytree(tiny_run.root, tmp_path / "run")
    md, html = write_report(tmp_path / "run")
    page = html.read_text()
    assert 'src="data:image/png;base64,' in page and 'src="figures/' not in page
    assert numbers_not_in_sources(md.read_text(), tiny_run.metrics(), json.loads(
        (tmp_path / "run" / "config.json").read_text())) == []


def _record(started: str, seconds: float, invocation: str, **extra) -> dict:
    return {"hash": "0123456789abcdef", "seconds": seconds, "started": f"2026-11-29T04:{started}+00:00",
            "invocation": f"2026-11-29T04:{invocation}+00:00", **extra}


def test_timeline_shows_the_stages_the_last_command_made():
    stages = {
        "autoencoder": _record("00:01.000", 8.0, "00:00.000"),                  # an earlier command's
        "classifier": _record("10:02.500", 2.0, "10:00.000", beside=True),
        "fewshot": _record("10:01.000", 9.5, "10:00.000"),
        "gan": _record("10:03.000", 1.0, "10:00.000", reused_from="/elsewhere/run"),  # taken, not made
        "flow": {"hash": "0123456789abcdef", "seconds": 4.0, "finished": "2026-11-29T04:10:09+00:00"},  # older record
    }
    assert timeline(stages) == [("this process", "fewshot", 1.0, 9.5), ("beside", "classifier", 2.5, 2.0)]
    assert timeline({"flow": stages["flow"]}) == []
    assert timeline({"fewshot": {**stages["fewshot"], "started": "yesterday"}}) == []  # a hand-edited time
    assert timeline({"fewshot": {k: v for k, v in stages["fewshot"].items() if k != "seconds"}}) == []


def test_report_draws_the_timeline_where_stages_json_has_times(tmp_path):
    config = {"seed": 0, "quick": False, "environment": {}}
    (tmp_path / "figures").mkdir()
    (tmp_path / "metrics.json").write_text(json.dumps(FAKE_METRICS))
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "stages.json").write_text(json.dumps({"autoencoder": _record("00:01.250", 8.0, "00:00.000")}))
    md, _ = write_report(tmp_path)
    assert (tmp_path / "figures" / "timeline.png").stat().st_size > 1000
    assert "figures/timeline.png" in md.read_text()
    assert numbers_not_in_sources(md.read_text(), FAKE_METRICS, config) == []


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=30),
                        st.just("2026-11-29T04:10:02.500+00:00"), st.just("2026-11-29T04:10:02"), st.lists(st.integers()))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["autoencoder", "gan", "flow"]), st.fixed_dictionaries(
    {"hash": st.just("0123456789abcdef")},
    optional={k: JSON_VALUES for k in ("started", "invocation", "seconds", "beside", "reused_from")})))
def test_timeline_never_fails_on_records_of_any_shape(stages):
    """stages.json as a user may leave it: the timeline is drawn or skipped, never a traceback."""
    for lane, name, start, seconds in timeline(stages):
        assert lane in ("this process", "beside") and name in stages
        assert math.isfinite(start) and math.isfinite(seconds) and seconds >= 0  # a figure can be drawn
