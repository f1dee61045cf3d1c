"""--reuse: a run takes the stages another run finished with the same settings, never one made with other settings
or missing a file, and waits for (rather than repeats) a stage that a sibling is making."""
import json
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from latentlab import pipeline, reuse
from latentlab.cli import main
from latentlab.pipeline import Pipeline, Stage
from latentlab.runfolder import Run, write_text
from tests.conftest import tiny_config

CALLS = []


def _stage(name):
    def run(ctx):
        CALLS.append((name, ctx.run.root.name))
        value = {"first": ctx.config.autoencoder.epochs, "independent": ctx.config.classifier.epochs,
                 "second": ctx.config.fewshot.draws, "third": ctx.config.gan.steps}[name]
        write_text(ctx.run.root / "figures" / f"{name}.txt", f"{name} {value} made in {ctx.run.root.name}")
        return {name: {"value": value, "made_in": ctx.run.root.name}}
    return run


@pytest.fixture
def stages(monkeypatch):
    """first and independent read nothing; second and third read first."""
    CALLS.clear()
    monkeypatch.setattr(pipeline, "STAGES", [
        Stage("first", _stage("first"), ("autoencoder",), ("figures/first.txt",), ()),
        Stage("independent", _stage("independent"), ("classifier",), ("figures/independent.txt",), ()),
        Stage("second", _stage("second"), ("fewshot",), ("figures/second.txt",), ("first",)),
        Stage("third", _stage("third"), ("gan",), ("figures/third.txt",), ("first",)),
    ])


def records(run):
    return json.loads((run.root / "stages.json").read_text())


def test_a_run_takes_what_another_finished_with_the_same_settings_and_makes_the_rest(tmp_path, stages):
    a, b = Run(tmp_path / "a", create=True), Run(tmp_path / "b", create=True)
    Pipeline(a, tiny_config()).run_all(workers=1)
    assert records(a)["first"]["files"] == ["figures/first.txt"]
    assert records(a)["first"]["sections"] == {"first": a.metrics()["first"]}  # as the stage returned it

    changed = tiny_config()
    changed.gan.steps += 1  # only the third stage's settings differ
    Pipeline(b, changed, reuse=(a.root,)).run_all(workers=1)
    assert [c for c in CALLS if c[1] == "b"] == [("third", "b")]  # the only stage b made itself
    mine = records(b)
    for name in ("first", "independent", "second"):
        assert mine[name]["reused_from"] == str(a.root) and mine[name]["hash"] == records(a)[name]["hash"]
        assert (b.root / f"figures/{name}.txt").read_text() == f"{name} {a.metrics()[name]['value']} made in a"
        assert b.metrics()[name] == a.metrics()[name]
    assert "reused_from" not in mine["third"] and b.metrics()["third"] == {"value": changed.gan.steps, "made_in": "b"}

    # b now counts as done: run again, nothing is made or taken
    CALLS.clear()
    Pipeline(b, changed, reuse=(a.root,)).run_all(workers=1)
    assert CALLS == [] and records(b) == mine


def test_a_donor_with_other_settings_a_missing_file_or_a_foreign_record_is_not_used(tmp_path, stages):
    a = Run(tmp_path / "runs" / "a", create=True)
    Pipeline(a, tiny_config()).run_all(workers=1)
    (a.root / "figures" / "second.txt").unlink()  # second lost a file
    damaged = records(a)
    damaged["independent"]["files"] = ["../../outside.txt", "figures/independent.txt"]  # not a path in the run
    (a.root / "stages.json").write_text(json.dumps(damaged))

    other = tiny_config()
    other.autoencoder.epochs += 1  # first (and what reads it) made with other settings
    b = Run(tmp_path / "runs" / "b", create=True)
    CALLS.clear()
    Pipeline(b, other, reuse=(tmp_path / "runs",)).run_all(workers=1)  # a folder of runs: a, and b itself left out
    assert sorted(c[0] for c in CALLS) == ["first", "independent", "second", "third"]
    assert not any("reused_from" in r for r in records(b).values())

    c = Run(tmp_path / "runs" / "c", create=True)
    CALLS.clear()
    Pipeline(c, tiny_config(), reuse=(tmp_path / "runs",)).run_all(workers=1)
    assert CALLS == [("second", "c")]  # a's second is missing a file, b's was made from another first
    assert records(c)["first"]["reused_from"] == str(a.root) and records(c)["third"]["reused_from"] == str(a.root)
    assert records(c)["independent"]["reused_from"] == str(b.root)  # a's record names a file outside its folder


def test_a_stage_a_sibling_is_making_is_waited_for_not_made_twice(tmp_path, stages):
    """b finds first claimed by a: it makes independent meanwhile, waits, then takes first from a."""
    sweep = tmp_path / "sweep"
    a, b = Run(sweep / "a", create=True), Run(sweep / "b", create=True)
    config = tiny_config()
    held = reuse.claim(reuse.claim_folders([sweep]), "first", pipeline.stage_hashes(config)["first"])
    assert isinstance(held, list) and len(held) == 1  # this test holds a's claim on first

    thread = threading.Thread(target=Pipeline(b, config, reuse=(sweep,)).run_all, kwargs={"workers": 1})
    thread.start()
    thread.join(2)
    assert thread.is_alive() and CALLS == [("independent", "b")]  # b did what it could, and now waits

    Pipeline(a, config).run_stage("first")
    reuse.release(held)
    thread.join(10)
    assert not thread.is_alive()
    assert CALLS == [("independent", "b"), ("first", "a"), ("second", "b"), ("third", "b")]
    assert records(b)["first"]["reused_from"] == str(a.root)


def test_a_claim_is_one_runs_at_a_time(tmp_path):
    folders = reuse.claim_folders([tmp_path])
    first = reuse.claim(folders, "gan", "abc")
    assert isinstance(first, list) and reuse.claim(folders, "gan", "abc") == tmp_path / ".making" / "gan-abc"
    assert isinstance(reuse.claim(folders, "gan", "other-hash"), list)  # another hash: another stage
    reuse.release(first)
    again = reuse.claim(folders, "gan", "abc")
    assert isinstance(again, list) and again
    reuse.release(again)


def test_reuse_of_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r"), "--reuse", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reuse" in err and "not a folder" in err
    assert not (tmp_path / "r").exists()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(
    ["", "figures/first.txt", "first", "../x", "/etc/passwd", "figures", "a\0b", "HASH"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["hash", "files", "sections", "first", "x"]), inner, max_size=4), max_leaves=8)


RECORDS = st.one_of(JSON, st.fixed_dictionaries({  # records near a good one: damage in one field or another
    "hash": JSON, "files": st.lists(st.sampled_from(["figures/first.txt", "../x", "/etc/passwd", "nope.txt", 3]),
                                    max_size=3),
    "sections": st.one_of(JSON, st.dictionaries(st.sampled_from(["first", "x"]), JSON, max_size=2))}))


@settings(derandomize=True, database=None, deadline=None, max_examples=80,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=RECORDS, keep_hash=st.booleans())
@example(record={"files": ["figures/first.txt"], "sections": {"first": {"a": [1]}}}, keep_hash=True)
@example(record={"files": ["figures/first.txt"], "sections": {"first": [1]}}, keep_hash=True)
@example(record={"files": ["figures/first.txt"], "sections": {}}, keep_hash=True)
@example(record={"files": ["figures/first.txt", "nope.txt"], "sections": {"first": {}}}, keep_hash=True)
def test_any_donor_record_is_taken_whole_or_not_at_all(tmp_path_factory, stages, record, keep_hash):
    """Whatever a donor's stages.json holds, taking a stage never raises; what is taken is whole."""
    root = tmp_path_factory.mktemp("fuzz")
    donor, b = Run(root / "donor", create=True), Run(root / "b", create=True)
    config = tiny_config()
    write_text(donor.root / "figures" / "first.txt", "made in donor")
    if keep_hash and isinstance(record, dict):  # often the right hash, so that the rest of the record is what counts
        record = {**record, "hash": pipeline.stage_hashes(config)["first"]}
    (donor.root / "stages.json").write_text(json.dumps({"first": record}))
    taken = Pipeline(b, config, reuse=(root,)).try_reuse("first")
    if taken:
        assert records(b)["first"]["files"] == record["files"]
        assert all(b.metrics()[k] == v for k, v in record["sections"].items())
        assert all((b.root / f).read_text() == "made in donor" for f in record["files"])
    else:
        assert not (b.root / "stages.json").exists()


def test_a_stage_is_taken_as_it_was_made_not_as_later_stages_rewrote_its_section(tmp_path, monkeypatch):
    """The evaluation rewrites the GANs' sections (adding their quality); a run taking the GAN gets the GAN's own."""
    def made(ctx):
        write_text(ctx.run.root / "made.txt", "made")
        return {"made": {"steps": ctx.config.gan.steps}}

    def later(ctx):
        return {"later": {"samples": ctx.config.evaluation.samples},
                "made": {**ctx.run.metrics()["made"], "quality": ctx.config.evaluation.samples}}

    monkeypatch.setattr(pipeline, "STAGES", [Stage("made", made, ("gan",), ("made.txt",), ()),
                                             Stage("later", later, ("evaluation",), (), ("made",))])
    a, b = Run(tmp_path / "a", create=True), Run(tmp_path / "b", create=True)
    Pipeline(a, tiny_config()).run_all(workers=1)
    assert a.metrics()["made"]["quality"] == tiny_config().evaluation.samples  # rewritten in a by `later`

    assert Pipeline(b, tiny_config(), reuse=(a.root,)).try_reuse("made")
    assert b.metrics()["made"] == {"steps": tiny_config().gan.steps}  # as `made` returned it: no quality yet
