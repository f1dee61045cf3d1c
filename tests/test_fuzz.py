"""Fuzzing the input checks, as trusted tools do: drawn settings and drawn damage to a run's files.

The only outcomes allowed: success that used the input as given, or exit status 2 with one line on stderr.
Never a traceback, never a success that ignored the input. Hypothesis runs derandomized (the same examples
every time), a bounded number of them, with no example database, so CI is repeatable and quick.
"""
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentlab import cli
from latentlab.checks import FIELDS, MAX_SEED, check_fields
from latentlab.pipeline import Pipeline

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

KEYS = ([f"{section}.{key}" for section, spec in FIELDS.items() if isinstance(spec, dict) for key in spec]
        + [name for name, spec in FIELDS.items() if not isinstance(spec, dict)]
        + ["nonsense.key", "gan", "gan.lr.x", "", "autoencoder.", ".lr"])
TEXTS = st.one_of(
    st.integers(-2**70, 2**70).map(str),                                       # in range, negative, huge
    st.floats(allow_nan=True, allow_infinity=True).map(repr),                  # nan, inf, -0.0, 1e+300, ...
    st.sampled_from(["", " ", "nan", "-inf", "1e400", "true", "false", "yes", "0", "-0", "1", "2", "3", "10", "64",
                     "1.5", "2.0", "abc", "balanced", "random", "hinge", "nonsaturating", "auto", "cpu", "cuda",
                     "1_000", "0x10", "None", "null", "/no/such/folder", "/tmp",
                     "1\n2", "a\rb", "\x0b", "x\u2028y", "5\x00", "\x1b[2J"]),           # line breaks, NUL, escapes
    st.text(max_size=6),                                                       # anything, control characters too
)
SEEDS = st.one_of(st.none(), st.integers(-2**65, 2**65), st.sampled_from([0, 1, MAX_SEED, MAX_SEED + 1, -1]))


def outcome(argv, capsys) -> tuple[int, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return code, capsys.readouterr().err


def assert_refused_in_one_line(err: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(("latentlab: error: ", "latentlab run: error: ", "latentlab evaluate: error: ")), err
    assert "Traceback" not in err


def parsed(text: str, spec: tuple):
    """What a value's text means, independently of latentlab's own conversion."""
    if spec[0] == "int":
        return int(text)
    if spec[0] == "float":
        return float(text)
    if spec[0] == "bool":
        return text.lower() in ("1", "true", "yes")
    return text


def spec_of(key: str):
    section, _, name = key.partition(".")
    spec = FIELDS[section]
    return spec[name] if name else spec


@pytest.fixture
def no_work(monkeypatch):
    """Stop right where the first stage would start; return the settings it would have started with."""
    seen = {}

    def start(self, *args, **kwargs):
        seen["config"] = self.config

    monkeypatch.setattr(Pipeline, "run_all", start)
    monkeypatch.setattr(Pipeline, "run_stage", start)
    monkeypatch.setattr(Pipeline, "write_config", lambda self: None)
    return seen


@settings(FUZZ, max_examples=150)
@given(command=st.sampled_from(["run", "evaluate"]), seed=SEEDS,
       assignments=st.lists(st.tuples(st.sampled_from(KEYS), TEXTS), max_size=3))
def test_drawn_settings_are_used_as_given_or_refused_in_one_line(command, seed, assignments, gan_run, tmp_path,
                                                                 no_work, capsys):
    if command == "run":
        argv = ["run", "--out", tmp_path / "run"]
    else:  # a stage command on a trained run: its config.json, then the options
        if not (tmp_path / "trained").exists():
            shutil.copytree(gan_run.root, tmp_path / "trained")
        argv = ["evaluate", "--run", tmp_path / "trained"]
    if seed is not None:
        argv += ["--seed", seed]
    for key, text in assignments:
        argv += ["--set", f"{key}={text}"]
    no_work.clear()
    code, err = outcome(argv, capsys)
    if code == 2:
        assert_refused_in_one_line(err)
        assert "config" not in no_work  # refused before the first stage
        return
    assert code == 0, err
    config = no_work["config"]
    check_fields(config)
    given_values = {"seed": seed} if seed is not None else {}
    given_values.update({key: text for key, text in assignments})  # the last assignment of a key wins
    for key, text in given_values.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(config, section), name) if name else getattr(config, section)
        expected = text if key == "seed" and not isinstance(text, str) else parsed(text, spec_of(key))
        assert value == expected, (key, text, value)
        if isinstance(value, float):
            assert math.isfinite(value)
    assert 0 <= config.seed <= MAX_SEED


# ---- damaged run files ----------------------------------------------------------------------------------

FILES = ["config.json", "stages.json", "metrics.json", "split.npz", "checkpoints/autoencoder.pt",
         "checkpoints/classifier.pt", "checkpoints/gan.pt", "checkpoints/cgan.pt"]
# What each command reads; damage to a file it reads must be refused, damage elsewhere must not matter.
COMMANDS = {
    "sample": (["sample", "--count", "3", "--out", "{out}/x.png"], {"checkpoints/gan.pt", "checkpoints/autoencoder.pt"}),
    "sample-digit": (["sample", "--count", "3", "--digit", "4", "--out", "{out}/x.npz"],
                     {"checkpoints/cgan.pt", "checkpoints/autoencoder.pt"}),
    "report": (["report"], {"config.json", "metrics.json"}),
    "train-cgan": (["train-cgan", "--set", "cgan.steps=5"],
                   {"config.json", "stages.json", "metrics.json", "split.npz", "checkpoints/autoencoder.pt"}),
}
# wrong for any of the three JSON files: not an object, a section or record that is not an object, a timing
WRONG_ANY_JSON = ["[]", "1", '"text"', "null", "true", '{"autoencoder": []}', '{"gan": 3}', '{"seed": "zero"}',
                  '{"timings_s": {"gan": "x"}}', '{"autoencoder": "x"}', '{"environment": []}']
# settings of a wrong type or range: wrong in config.json, and records without a hash in stages.json
WRONG_SETTINGS = ['{"autoencoder": {"epochs": 1.5}}', '{"gan": {"lr": NaN}}', '{"fewshot": {"draw": "all"}}',
                  '{"evaluation": {"samples": -3}}', '{"autoencoder": {"epoch": 3}}', '{"quick": "yes"}']


@st.composite
def damage(draw):
    """(file, how): truncated, random bytes, wrong JSON types, another checkpoint, edited checkpoint, bad split."""
    target = draw(st.sampled_from(FILES))
    kinds = ["truncate", "random"]
    if target.endswith(".json"):
        kinds.append("json")
    if target.endswith(".pt"):
        kinds += ["swap", "edit"]
    if target == "split.npz":
        kinds.append("split")
    kind = draw(st.sampled_from(kinds))
    if kind == "truncate":
        return target, kind, draw(st.floats(0, 0.99))
    if kind == "random":
        return target, kind, draw(st.binary(max_size=300))
    if kind == "json":
        return target, kind, draw(st.sampled_from(WRONG_ANY_JSON + (WRONG_SETTINGS if target != "metrics.json" else [])))
    if kind == "swap":
        return target, kind, draw(st.sampled_from([f for f in FILES if f.endswith(".pt") and f != target]))
    if kind == "edit":
        return target, kind, draw(st.sampled_from(["no kind", "kind", "nan weight", "shape", "args", "stats"]))
    return target, kind, draw(st.sampled_from(["keys", "float", "range", "overlap", "size"]))


def apply(root, target: str, kind: str, detail) -> bool:
    """Damage root/target; False when the damage happens to leave a valid file of its kind."""
    path = root / target
    if kind == "truncate":  # at least the last two bytes go: a JSON file's closing brace and newline
        data = path.read_bytes()
        path.write_bytes(data[:min(int(len(data) * detail), len(data) - 2)])
    elif kind == "random":
        path.write_bytes(b"\0" + detail)  # a NUL first: never valid JSON, never a zip by chance
    elif kind == "json":
        path.write_text(detail)
    elif kind == "swap":
        shutil.copy(root / detail, path)
    elif kind == "edit":
        checkpoint = torch.load(path, weights_only=True)
        name = next(iter(checkpoint["state_dict"]))
        if detail == "no kind":
            checkpoint.pop("kind", None)
        elif detail == "kind":
            checkpoint["kind"] = "something else"
        elif detail == "nan weight":
            checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
        elif detail == "shape":
            checkpoint["state_dict"][name] = checkpoint["state_dict"][name][:1]
        elif detail == "args":
            checkpoint["model_args"] = {k: 10**8 for k in checkpoint["model_args"]}
        elif "code_std" in checkpoint:
            checkpoint["code_std"] = -checkpoint["code_std"]
        else:
            return False
        torch.save(checkpoint, path)
    else:
        train, val = np.arange(55_000), np.arange(55_000, 60_000)
        arrays = {"keys": {"train": train}, "float": {"train": train * 1.0, "val": val},
                  "range": {"train": train + 10, "val": val}, "overlap": {"train": train, "val": train[:5000]},
                  "size": {"train": train[:100], "val": val}}[detail]
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    return True


@settings(FUZZ, max_examples=40)
@given(command=st.sampled_from(["sample", "sample-digit", "report", "sample", "report", "train-cgan"]),
       broken=damage())
def test_damaged_run_files_are_refused_in_one_line(command, broken, gan_run, tmp_path, capsys):
    from latentlab.report import write_report

    template = tmp_path / "template"
    if not template.exists():
        shutil.copytree(gan_run.root, template)
        write_report(template)
    root = tmp_path / "run"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root)
    target, kind, detail = broken
    damaged = apply(root, target, kind, detail)
    args, reads = COMMANDS[command]
    argv = [args[0], "--run", root] + [a.format(out=tmp_path) for a in args[1:]]
    code, err = outcome(argv, capsys)
    if damaged and target in reads:
        assert code == 2, (command, broken, err)
        assert_refused_in_one_line(err)
        assert target.rsplit("/")[-1] in err  # the message names the file
    else:
        assert code == 0, (command, broken, err)
