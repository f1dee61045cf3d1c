"""The `latentlab` command: `run` does the whole study; each stage also has its own subcommand."""
import argparse
import os
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

from latentlab.errors import LatentlabError

# subcommand -> pipeline stage it runs on an existing run folder
STAGE_COMMANDS = {
    "train-ae": ("autoencoder", "train the convolutional autoencoder"),
    "train-classifier": ("classifier", "train the digit classifier that judges generated images"),
    "fewshot": ("fewshot", "classify digits from the latent codes with 50 labels: the reference MLPs and graph methods"),
    "train-gan": ("gan", "train the latent GAN (noise -> AE code)"),
    "train-cgan": ("cgan", "train the conditional latent GAN (noise + digit -> AE code)"),
    "train-flow": ("flow", "train the latent flow-matching generator (noise [+ digit] -> AE code by an ODE)"),
    "interpolate": ("interpolation", "interpolate between GAN samples and between real digits, and score the paths"),
    "evaluate": ("evaluation", "score the GANs, the flow and Gaussian-mixture baselines with the classifier (FD, "
                              "precision/recall); the baselines and floors first, where they are not done"),
    "report": ("report", "write report.md and report.html from the run's metrics and figures"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {one_line(message)}\n")
        raise SystemExit(2)


def one_line(message: str) -> str:
    """The message with every character that could break or garble the line escaped (a typed newline, say)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, help="random seed of the whole run, 0-2147483647 (default 0, or the run's own)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="where every stage runs (default auto: CUDA when present, else the CPU)")
    p.add_argument("--data-dir", help="folder with the four MNIST-format IDX files (default: the shipped MNIST)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change any setting, e.g. --set gan.steps=5000 (repeatable; see config.json for names)")


def build_parser() -> Parser:
    parser = Parser(prog="latentlab", description=__doc__)
    from latentlab import __version__

    parser.add_argument("--version", action="version", version=f"latentlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    from latentlab.checks import settings_help

    p = sub.add_parser("run", help="run every stage into a run folder (skips stages already done)",
                       epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="run folder (default runs/<data>-seed<seed>, with -quick after it for --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller pipeline for a first look: smaller slices, fewer epochs and steps (measured at "
                        "commit c9bbd8e on 2 CPU cores: 30-32 s wall, about 0.9 GB peak memory)")
    p.add_argument("--force", action="store_true", help="redo every stage, even those already done")
    p.add_argument("--reuse", action="append", default=[], metavar="PLACE",
                   help="take each stage that a run folder here (or in this folder of run folders, such as a sweep) "
                        "finished with the same settings, instead of making it again; may be given more than once")
    _add_common(p)

    for command, (_, help_text) in STAGE_COMMANDS.items():
        p = sub.add_parser(command, help=help_text)
        p.add_argument("--run", required=True, help="the run folder")
        if command == "report":  # it only reads the run: no option that would change its settings
            continue
        if command == "fewshot":
            p.add_argument("--draw", choices=["balanced", "random"], help="5 labels per digit, or 50 at random")
            p.add_argument("--draws", type=int, metavar="N", help="independent label draws (default 10)")
        p.add_argument("--force", action="store_true",
                       help="redo the stage even if it is done with these settings (otherwise nothing is written)")
        _add_common(p)

    p = sub.add_parser("sweep", help="run many seeds and settings (each trial a run folder) and report their spread")
    p.add_argument("--out", required=True, help="sweep folder: one run folder per trial, sweep.json/.md/.html")
    p.add_argument("--seeds", default="0-4", help="seeds: a range 0-4 or a list 0,3,7 (default 0-4)")
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="try every value of a setting (repeatable: every combination is a grid point)")
    p.add_argument("--quick", action="store_true", help="every trial a --quick run")
    p.add_argument("--workers", type=int, help="trials at once on this machine (default: one per core)")
    p.add_argument("--address", help="run the trials as tasks on this Ray cluster ('auto': the local one); "
                                     "needs pip install 'latentlab[cluster]'")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where trials train (on a GPU they share it)")
    p.add_argument("--data-dir", help="folder with the four MNIST-format IDX files (default: the shipped MNIST)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="change a setting in every trial (repeatable)")
    p.add_argument("--reuse", action="append", default=[], metavar="PLACE",
                   help="trials also take finished stages with the same settings from here (a run folder or a folder "
                        "of them, such as another sweep's); they always take them from each other")

    p = sub.add_parser("sample", help="generate digits with a trained run's GAN or flow into a .png grid or a .npz file")
    p.add_argument("--run", required=True, help="a run folder with trained generators (from `latentlab run`)")
    p.add_argument("--count", type=int, required=True, help="how many digits (1-100000)")
    p.add_argument("--out", required=True, help="FILE.png (a grid) or FILE.npz (images uint8 N x 28 x 28, labels)")
    p.add_argument("--digit", type=int, help="ask for this digit (0-9): the conditional GAN, or the flow guided to it; "
                   "without it the plain GAN, or the flow with no digit")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed, 0-2147483647; the same seed gives the same digits (default 0)")
    p.add_argument("--model", default="gan", help="gan (default) or flow")

    p = sub.add_parser("demo", help="serve a web page to generate and interpolate digits with a trained run")
    p.add_argument("--run", required=True, help="a run folder with trained models (from `latentlab run`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    return parser


def _convert(text: str, default, key: str):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise LatentlabError(f"--set {key}={text}: expected true or false")
    try:
        return type(default)(text) if default is not None else text
    except ValueError:
        raise LatentlabError(f"--set {key}={text}: expected {'a whole number' if isinstance(default, int) else 'a number'}") from None


def apply_settings(config, assignments: list[str]) -> None:
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep:
            raise LatentlabError(f"--set {item}: expected SECTION.KEY=VALUE")
        target, *path = key.split(".")
        obj = config
        names = [target, *path]
        for name in names[:-1]:
            if not is_dataclass(obj) or name not in {f.name for f in fields(obj)}:
                raise LatentlabError(f"--set {key}: unknown setting")
            obj = getattr(obj, name)
        last = names[-1]
        if key == "quick":  # it changes many settings at once, which --set alone would not
            raise LatentlabError(f"--set {key}: use the --quick option of `latentlab run`")
        if not is_dataclass(obj) or last not in {f.name for f in fields(obj)} or is_dataclass(getattr(obj, last)):
            raise LatentlabError(f"--set {key}: unknown setting")
        setattr(obj, last, _convert(text, getattr(obj, last), key))


def resolve_config(args, base=None):
    from latentlab.config import QUICK, make_config, quick_shrinks_judge, validate

    data_dir = None
    if args.data_dir is not None:
        if not Path(args.data_dir).is_dir():
            raise LatentlabError(f"--data-dir {args.data_dir}: not a folder")
        data_dir = str(Path(args.data_dir).resolve())
    if base is None:  # --quick leaves the judge's settings alone where the shipped judge serves (shipped MNIST)
        config = make_config(quick=getattr(args, "quick", False), data_dir=data_dir)
    else:
        config = base
        if data_dir is not None:
            config.data_dir = data_dir
    if args.seed is not None:
        config.seed = args.seed
    if args.device is not None:
        config.device = args.device
    if getattr(args, "draw", None) is not None:
        config.fewshot.draw = args.draw
    if getattr(args, "draws", None) is not None:
        config.fewshot.draws = args.draws
    apply_settings(config, args.set)
    if base is None and quick_shrinks_judge(config):
        # --quick --set classifier.shipped=false: a judge is trained after all, so the quick one (as on other data),
        # not the default's 3 epochs on 55k images; the --set values are applied again on top and still win
        for key, value in QUICK["classifier"].items():
            setattr(config.classifier, key, value)
        apply_settings(config, args.set)
    validate(config)
    return config


def prepare_device(config) -> None:
    """Refuse an unavailable device before any work; on CUDA let scikit-learn fit on the GPU (array-API
    dispatch needs SCIPY_ARRAY_API set before scipy is first imported)."""
    from latentlab.context import resolve_device

    if resolve_device(config.device).type == "cuda":
        os.environ.setdefault("SCIPY_ARRAY_API", "1")


def default_out(config) -> str:
    """runs/<data>-seed<seed>, and -quick after it for --quick: a quick run in the full run's folder would replace
    every stage of it with its quick settings."""
    data = "mnist" if config.data_dir is None else Path(config.data_dir).name
    return f"runs/{data}-seed{config.seed}" + ("-quick" if config.quick else "")


def cmd_run(args) -> None:
    from latentlab.checks import check_config, check_run_files

    config = resolve_config(args)
    out = args.out or default_out(config)
    if Path(out).is_dir():  # a run folder to resume: its files are checked before anything is written
        check_run_files(out)
    check_config(config, out if Path(out).is_dir() else None)
    prepare_device(config)
    from latentlab.pipeline import Pipeline, locked
    from latentlab.runfolder import Run

    from latentlab.reuse import check_places

    check_places(args.reuse)
    run = Run(out, create=True)
    with locked(run):
        # --force makes every stage here, so it takes none from elsewhere either
        Pipeline(run, config, reuse=() if args.force else tuple(args.reuse)).run_all(
            force=args.force, workers=config.stage_workers or None)
    report = run.root / "report.html"
    print(f"latentlab: run finished in {run.root}" + (f"; report: {report}" if report.exists() else ""))


def cmd_stage(args) -> None:
    from latentlab.checks import (MADE_BY, check_config, check_needs, check_own_settings, check_run_files,
                                  config_from_json)
    from latentlab.config import to_dict
    from latentlab.pipeline import Pipeline, locked, stage_named
    from latentlab.runfolder import Run

    stage = STAGE_COMMANDS[args.command][0]
    root = Path(args.run)
    if stage not in ("autoencoder", "classifier"):  # stages that need earlier ones never make a folder
        Run(root)
    elif root.exists() and not root.is_dir():
        raise LatentlabError(f"{root}: exists and is not a folder")
    config_path = root / "config.json"
    base = config_from_json(config_path) if config_path.exists() else None
    before = to_dict(base) if base is not None else None
    config = resolve_config(args, base)
    if before is not None:
        check_own_settings(before, to_dict(config), stage, args.command)
    if root.is_dir():
        check_run_files(root)
    check_config(config, root if root.is_dir() else None)
    check_needs(root, stage)  # all of it before the first file is written
    prepare_device(config)
    run = Run(root, create=True)
    with locked(run):
        pipeline = Pipeline(run, config)
        if pipeline.is_done(stage) and not args.force:  # e.g. `evaluate` of a finished run: it only reads
            print(f"latentlab: {stage} is done with these settings in {run.root}; nothing written (--force redoes it)")
            return
        if before is None or to_dict(config) != before:  # unchanged settings: config.json stays as the run wrote it
            pipeline.write_config()
        # the stages it reads that make no checkpoint (the evaluation's baselines) are made first where not done
        for earlier in (r for r in stage_named(stage).reads if r not in MADE_BY and not pipeline.is_done(r)):
            print(f"latentlab: {earlier} first (the {stage} reads it)")
            pipeline.run_stage(earlier)
        pipeline.run_stage(stage)
    print(f"latentlab: {stage} finished in {run.root}")


def cmd_report(args) -> None:
    """Write report.md and report.html from the run's files; config.json and metrics.json are only read."""
    from latentlab.checks import check_run_files, config_from_json, read_metrics
    from latentlab.pipeline import locked
    from latentlab.report import write_report
    from latentlab.runfolder import Run

    run = Run(args.run)
    check_run_files(run.root)  # stages.json too, where there is one: all checked before the lock file or a report
    config_from_json(run.root / "config.json")  # is written (config.json and metrics.json must be there)
    if not {name for name in read_metrics(run.root / "metrics.json") if name != "timings_s"}:
        # an emptied metrics.json would replace a report of results with one of none
        raise LatentlabError(f"{run.root / 'metrics.json'}: holds no results; run the stages first (latentlab run "
                             f"--out {run.root})")
    with locked(run):
        md, html = write_report(run.root)
    print(f"latentlab: wrote {md} and {html}")


def cmd_sample(args) -> None:
    from latentlab.gan import write_samples  # torch and the models only: a cold `sample` stays quick

    out = write_samples(args.run, args.count, args.out, digit=args.digit, seed=args.seed, model=args.model)
    print(f"latentlab: wrote {args.count} digits to {out}")


def cmd_demo(args) -> None:
    if not 1 <= args.port <= 65535:
        raise LatentlabError(f"--port {args.port}: must be 1-65535")
    from latentlab import demo  # imports Gradio only when the demo is asked for

    demo.serve(args.run, host=args.host, port=args.port)


def main(argv=None) -> int:
    command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        for value in vars(args).values():  # a shell cannot pass one, but a caller of main() can: no path takes it
            if any("\0" in text for text in (value if isinstance(value, list) else [value]) if isinstance(text, str)):
                raise LatentlabError(f"{one_line(value)}: an argument holds a NUL character")
        if args.command == "sweep":
            from latentlab.sweep import sweep

            return sweep(args, command="latentlab " + " ".join(argv))
        if args.command == "run":
            cmd_run(args)
        elif args.command == "report":
            cmd_report(args)
        elif args.command in STAGE_COMMANDS:
            cmd_stage(args)
        elif args.command == "sample":
            cmd_sample(args)
        elif args.command == "demo":
            cmd_demo(args)
    except LatentlabError as e:
        print(f"latentlab: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the system refuses (a name too long, a folder where a file goes, a full disk)
        where = f"{e.filename}: " if e.filename else ""
        print(f"latentlab: error: {one_line(where + (e.strerror or str(e)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("latentlab: interrupted; finished stages are kept, run the same command again to resume",
              file=sys.stderr)
        if command_line:  # not a caller of main() in this process
            # Leave at once: an interrupt that landed inside torch's or tqdm's threads could otherwise hang the
            # interpreter's shutdown or end it by SIGINT after all. Files are complete (atomic writes), the
            # run folder's lock goes with the process, and a stage beside was stopped on the way here.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
