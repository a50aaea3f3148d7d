"""The `ssau` command line. ``main(argv)`` takes a list so that tests run every command in-process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssau.aus import parse_au_list
from ssau.errors import STOPS, ConfigError, InputError, JournalError, LabelError, ShardError, UserError

# The marker of an uncoded AU where the user names none: EmotioNet's challenge files use 999.
DEFAULT_UNKNOWN = {"emotionet": "999", "csv": ""}


def _shard(args: argparse.Namespace) -> int:
    from ssau.faces.detect import EXTRA_MISSING, resolve  # lazy: a command imports only what it runs
    from ssau.remote import is_remote, join, public  # lazy: a command imports only what it runs
    from ssau.shard.plan import run_shard  # lazy: a command imports only what it runs
    from ssau.shard.write import ShardSettings  # lazy: a command imports only what it runs

    try:
        aus = parse_au_list(args.aus) if args.aus else None
    except ValueError as e:
        raise UserError(f"--aus: {e}") from None
    detector = resolve(args.detector) if args.align else "haar"  # only an aligned shard detects faces
    if args.align and not args.no_detect and args.detector == "auto" and detector == "haar":
        print(f"ssau shard: note: {EXTRA_MISSING}", file=sys.stderr)
    s = ShardSettings(format=args.format, images=str(Path(args.images).resolve()),
                      labels=str(Path(args.labels).resolve()) if args.labels else None, aus=aus,
                      unknown=args.unknown if args.unknown is not None else DEFAULT_UNKNOWN.get(args.format, ""),
                      frame_template=args.frame_template,
                      active_threshold=args.active_threshold, folds=args.folds, shard_size=args.shard_size,
                      resize=args.resize, quality=args.quality, seed=args.seed,
                      landmarks=str(Path(args.landmarks).resolve()) if args.landmarks else None,
                      landmark_pattern=args.landmark_pattern, landmark_frames=args.landmark_frames,
                      landmark_frame_column=args.landmark_frame_column,
                      min_landmark_confidence=args.min_landmark_confidence, require_landmarks=args.require_landmarks,
                      align=args.align, align_margin=args.align_margin, align_points=args.align_points,
                      detect=not args.no_detect, detector=detector, landmarks_from=args.landmarks_from,
                      flow=args.flow, flow_size=args.flow_size, flow_clip=args.flow_clip, validate=args.validate)
    if is_remote(args.out):
        from ssau.shard.upload import shard_to_url  # lazy: a command imports only what it runs

        doc = shard_to_url(s, args.out, args.stage, workers=args.workers, overwrite=args.overwrite,
                           progress=not args.quiet)
    elif args.stage:
        raise UserError("--stage is where shards wait for upload: it needs a URL --out (s3://bucket/prefix)")
    else:
        doc = run_shard(s, Path(args.out), workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    run = doc["last_run"]
    print(f"{doc['corpus']}: {doc['samples']} samples in {len(doc['shards'])} shards "
          f"({run['shards_written']} written, {run['shards_reused']} verified and kept) -> {public(args.out)}")
    if "uploaded" in run:
        print(f"  uploaded {run['uploaded']} files, {run['already_in_store']} already in the store")
    for reason, n in doc["skipped_by_reason"].items():
        print(f"  skipped {n:>7}  {reason}")
    for reason, n in doc["converted_by_reason"].items():
        print(f"  converted {n:>5}  {reason}")
    faces = doc["faces"]
    lm = faces["landmarks"]
    print(f"  landmarks: {lm['stored']} stored, {lm['no-landmarks']} without"
          + (f" ({lm.get('matched', 0)} matched in {lm.get('files', 0)} files under {args.landmarks}; "
             f"{lm.get('tracking-failed', 0)} tracking failed, {lm.get('frame-not-in-file', 0)} frames not in a file, "
             f"{lm.get('no-landmark-file', 0)} without a file)" if args.landmarks else ""))
    if args.align:
        print(f"  aligned to {args.align} px: " + ", ".join(f"{n} by {k}" for k, n in faces["aligned_by"].items()))
    if args.flow:
        print(f"  flow to frame t+{args.flow}: {faces['flow']['pairs']} pairs, {run['flow_pairs_per_s']:.1f} pairs/s"
              + "".join(f", {n} {k}" for k, n in faces["flow"]["failed"].items()))
    print(f"  {run['images_per_s']:.1f} images/s over {run['seconds']:.1f} s with {args.workers} worker(s), "
          f"--validate {args.validate}; "
          f"details in {join(public(args.out), 'dataset.json')}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from ssau.synth.corpus import render_corpus  # lazy: a command imports only what it runs
    from ssau.synth.faces import SynthSettings  # lazy: a command imports only what it runs

    if not 0.0 <= args.ambiguous <= 1.0:
        raise UserError(f"--ambiguous: {args.ambiguous} is not a fraction in [0, 1]")
    s = SynthSettings(subjects=args.subjects, tasks=args.tasks, frames=args.frames, size=args.size,
                      expression_images=args.expression_images, unlabelled=args.unlabelled, seed=args.seed,
                      ambiguous=args.ambiguous, style=args.style)
    summary = render_corpus(Path(args.out), s, workers=args.workers, progress=not args.quiet)
    print(summary)
    return 0


def _train(args: argparse.Namespace) -> int:
    from ssau.train.commands import train  # lazy: a command imports only what it runs

    train(args.config, args.overrides)
    return 0


def _cv(args: argparse.Namespace) -> int:
    from ssau.train.commands import cross_validate  # lazy: a command imports only what it runs

    cross_validate(args.config, args.overrides)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ssau.compare.command import compare  # lazy: a command imports only what it runs

    compare(args.config, args.methods, args.seeds, args.label_drop, args.folds, args.baseline, args.warm_start,
            args.warm_steps, args.dry_run, args.name, args.overrides, args.select_on or "", args.select_metric or "",
            args.selection, args.settings_from)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ssau.train.commands import evaluate  # lazy: a command imports only what it runs

    evaluate(args.checkpoint, args.shards, args.folds, args.batch, args.workers, args.incomplete)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ssau.predict.command import predict  # lazy: a command imports only what it runs

    predict(args.model, args.inputs, args.out, args.every, args.batch, args.workers, args.detector, args.device,
            not args.quiet)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ssau.predict.export import export_onnx  # lazy: a command imports only what it runs

    print(export_onnx(args.model, Path(args.onnx), args.opset, args.check))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ssau.train.demo import demo  # lazy: a command imports only what it runs

    if args.align and not 16 <= args.align <= 1024:
        raise UserError(f"--align {args.align}: 16 to 1024 px, or 0 for whole frames")
    demo(args.out, args.steps, args.backbone, args.size, args.subjects, args.frames, args.workers, args.style,
         args.align)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from ssau.train.commands import ui  # lazy: a command imports only what it runs

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: not a TCP port")
    return ui(args.uri, args.host, args.port)


def _upload(args: argparse.Namespace) -> int:
    from ssau.tracking.upload import upload  # lazy: a command imports only what it runs

    try:
        print(upload(Path(args.run_dir), args.uri, args.experiment))
    except JournalError as e:
        raise UserError(str(e)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssau", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    sh = sub.add_parser("shard", help="pack a corpus into webdataset tar shards + parquet index")
    sh.add_argument("format", help="bp4d, disfa, emotionet, csv, rafdb or folder")
    sh.add_argument("--images", required=True, help="image root (disfa: folder of LeftVideo<SN>_comp.avi or frames)")
    sh.add_argument("--labels", help="label file or folder, as the corpus ships it")
    sh.add_argument("--out", required=True, help="output directory, or any fsspec URL (s3://bucket/prefix, gs://...; "
                                                 "the [cloud] extra)")
    sh.add_argument("--stage", help="with a URL --out: the local directory shards are written to and resumed from "
                                    "before upload; needs disk for the whole sharded corpus (default: "
                                    "~/.cache/ssau/stage/<hash of the URL>)")
    sh.add_argument("--aus", help="AU list: a corpus name (bp4d, disfa, emotionet, gft) or e.g. 1,2,AU04")
    sh.add_argument("--unknown", default=None, help="csv/emotionet marker of an uncoded AU ('', 9, 999, -1)")
    sh.add_argument("--frame-template", help="disfa: frame path under --images with {subject}, {frame} (1-based "
                                             "label frame) or {index} (0-based), e.g. '{subject}/{frame:05d}.png'")
    sh.add_argument("--active-threshold", type=float, default=2.0, help="disfa: intensity that counts as active")
    sh.add_argument("--folds", help="bp4d, disfa (standard subject folds) or K (subjects round-robin into K folds)")
    sh.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    sh.add_argument("--resize", type=int, help="scale the shorter side to this many pixels (re-encodes)")
    sh.add_argument("--quality", type=int, default=95, help="JPEG quality when an image is re-encoded")
    sh.add_argument("--workers", type=int, default=1)
    sh.add_argument("--validate", choices=("full", "header"), default="full",
                    help="how a JPEG stored as it is gets checked. full: decoded (at 1/8 scale), which catches "
                         "truncated or corrupt data. header: its header only (SOF marker, declared size within "
                         "limits; microseconds instead of a decode), plus a full decode of 1 image in 64 chosen by "
                         "a hash of its key; damage after the header passes unless sampled, and training then "
                         "skips that sample. Same shards on sound plain JPEGs (header mode passes an MPO through; full "
                         "mode re-encodes it); other images are decoded in both modes")
    sh.add_argument("--seed", type=int, default=0, help="places subject-less images into numbered folds")
    fa = sh.add_argument_group("faces: landmarks, alignment, optical flow")
    fa.add_argument("--landmarks", help="folder of landmark CSVs: OpenFace 2.0 output or plain per-sequence CSVs")
    fa.add_argument("--landmark-pattern", help="CSV name under --landmarks with {subject}, {sequence}, {stem} "
                                               "(default per corpus: bp4d {subject}_{sequence}.csv, disfa "
                                               "{subject}.csv or LeftVideo{subject}_comp.csv, stills {stem}.csv)")
    fa.add_argument("--landmark-frames", choices=("number", "position"), default="number",
                    help="the CSV's frame column is the corpus frame number, or the 1-based position of the image "
                         "in its sorted folder (OpenFace run on a folder of frames)")
    fa.add_argument("--landmark-frame-column", default="frame", help="name of the CSV's frame column")
    fa.add_argument("--min-landmark-confidence", type=float, default=0.8,
                    help="OpenFace rows below this confidence (or success 0) count as no landmarks")
    fa.add_argument("--require-landmarks", action="store_true", help="skip frames without landmarks (no-landmarks)")
    fa.add_argument("--align", type=int, metavar="SIZE",
                    help="store SIZE x SIZE faces aligned by a similarity transform onto the canonical template "
                         "(landmarks), else a square detector box; frames with no face are skipped (no-face)")
    fa.add_argument("--align-margin", type=float, default=0.15, help="template margin, a fraction of the side")
    fa.add_argument("--align-points", choices=("five", "all"), default="five",
                    help="fit eye centres, nose tip and mouth corners, or all 68 landmarks")
    fa.add_argument("--no-detect", action="store_true", help="with --align: no face detector; frames without "
                                                            "landmarks or box are skipped as no-face")
    fa.add_argument("--detector", choices=("auto", "dlib", "haar"), default="auto",
                    help="with --align, for frames without landmarks: dlib's face detector and 68 landmarks (the "
                         "[faces] extra; its landmark model is for non-commercial use), OpenCV's Haar box, or auto: "
                         "dlib where installed")
    fa.add_argument("--landmarks-from", choices=("file", "detector"), default="file",
                    help="file: CSV or sidecar landmarks where there are some, else the detector; detector: dlib's "
                         "landmarks for every frame, even where a CSV has some (to compare)")
    fa.add_argument("--flow", type=int, default=0, metavar="K",
                    help="TV-L1 optical flow from frame t to t+K of each sequence (RTATL: 3), stored per sample")
    fa.add_argument("--flow-size", type=int, default=64, help="shorter side of the stored flow grid")
    fa.add_argument("--flow-clip", type=float, default=20.0, help="clip |u|, |v| at this many pixels")
    sh.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    sh.add_argument("--quiet", action="store_true", help="no progress bar")
    sh.set_defaults(run=_shard)

    sy = sub.add_parser("synth", help="render the synthetic AU corpus (BP4D, RAF-DB and folder layouts)")
    sy.add_argument("--out", required=True)
    sy.add_argument("--subjects", type=int, default=41, help="BP4D subject ids are used, so at most 41")
    sy.add_argument("--tasks", type=int, default=4, help="sequences per subject (T1..T8)")
    sy.add_argument("--frames", type=int, default=40, help="frames per sequence")
    sy.add_argument("--size", type=int, default=96, help="image side (classic) or frame width (realistic) in pixels")
    sy.add_argument("--style", choices=("classic", "realistic"), default="classic",
                    help="classic: faces filling the image; realistic: head-and-shoulders BP4D frames with smooth "
                         "pose drift, subtle AUs and OpenFace landmark CSVs (what `ssau demo` uses)")
    sy.add_argument("--expression-images", type=int, default=1000, help="RAF-DB-layout expression images")
    sy.add_argument("--ambiguous", type=float, default=0.2,
                    help="fraction of expression images whose face does not show their label")
    sy.add_argument("--unlabelled", type=int, default=2000, help="images in the unlabelled folder")
    sy.add_argument("--workers", type=int, default=1)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--quiet", action="store_true")
    sy.set_defaults(run=_synth)

    for name, fn, text in (("train", _train, "train one method on one fold"),
                           ("cv", _cv, "3-fold subject-independent cross-validation (child runs under one parent)")):
        tr = sub.add_parser(name, help=text)
        tr.add_argument("--config", help="YAML config (launch/recipes/...)")
        tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4 data.fold=2")
        tr.set_defaults(run=fn)

    co = sub.add_parser("compare", help="methods x seeds x label drops x folds as child runs of one parent run; "
                                        "finished cells are skipped; a paired report against a baseline")
    co.add_argument("--config", help="YAML config; its method section serves the method it names")
    co.add_argument("--methods", required=True, help="e.g. supervised,adversarial (or <method>-<variant>)")
    co.add_argument("--seeds", required=True, help="initialisation seeds: 0-4 or 0,2,5")
    co.add_argument("--label-drop", required=True, help="fractions of labelled images hidden: 0.5 or 0.5,0.3")
    co.add_argument("--folds", help="held-out folds, e.g. 1,2,3 (default: the config's data.fold)")
    co.add_argument("--baseline", help="the method paired differences are taken to (default: supervised)")
    co.add_argument("--warm-start", action="store_true",
                    help="per seed, drop and fold, one supervised run first; every method starts from its weights")
    co.add_argument("--warm-steps", type=int, help="steps of the warm-start run (default: train.steps)")
    co.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; run nothing")
    co.add_argument("--name", help="the parent run (default: compare-<config>-<hash of the grid>)")
    co.add_argument("--select-on", choices=("val",), help="score every cell on the AU validation split (the held-out "
                    "fold is never read) and choose per method its best label (<method>-<variant>)")
    co.add_argument("--select-metric", choices=("f1", "auc"), help="what --select-on ranks by (default: f1)")
    co.add_argument("--selection", help="also write --select-on's selection file here (it is always written to "
                    "<train.out>/<name>/compare/selection.json and logged with the parent run)")
    co.add_argument("--settings-from", help="a selection file: each compared method takes the settings chosen there")
    co.add_argument("overrides", nargs="*", help="key=value for every cell; <method>.<key>=value for one method")
    co.set_defaults(run=_compare)

    ev = sub.add_parser("eval", help="evaluate a checkpoint; prints a per-AU table")
    ev.add_argument("--checkpoint", required=True, help="a run directory (its model.pt), a model.pt, a run's "
                    "checkpoints/step-N.pt, or an MLflow model URI (runs:/<id>/model; MLFLOW_TRACKING_URI names "
                    "the store)")
    ev.add_argument("--shards", nargs="+", required=True, help="shard directories")
    ev.add_argument("--folds", type=int, nargs="*", help="folds to evaluate (default: every fold of the shards, not "
                                                         "only the held-out fold of the model's training run)")
    ev.add_argument("--batch", type=int, default=64)
    ev.add_argument("--workers", type=int, default=2)
    ev.add_argument("--incomplete", choices=("fail", "warn"), default="fail",
                    help="when fewer samples are scored than the index lists: stop (default) or warn and score the rest")
    ev.set_defaults(run=_eval)

    pr = sub.add_parser("predict", help="a trained model on images, folders, videos or shard directories: one row per "
                                        "face per frame (AU probabilities and presence) in a CSV or parquet file")
    pr.add_argument("model", help="a run directory, a model.pt, or an MLflow model URI (runs:/<id>/model, "
                                  "models:/<name>/<version>; MLFLOW_TRACKING_URI names the store)")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="images, folders (recursive), videos, shard directories")
    pr.add_argument("--out", required=True, help="FILE.csv or FILE.parquet")
    pr.add_argument("--every", type=int, default=1, help="videos: score every N-th frame")
    pr.add_argument("--batch", type=int, default=64, help="faces per forward pass")
    pr.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding and aligning")
    pr.add_argument("--detector", choices=("auto", "dlib", "haar"), default="auto",
                    help="faces without a landmark CSV beside them: dlib's faces and 68 landmarks (the [faces] "
                         "extra), OpenCV's Haar box, or auto: dlib where installed")
    pr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(run=_predict)

    ex = sub.add_parser("export", help="the recognition path as one ONNX file (dynamic batch), checked against "
                                       "PyTorch with onnxruntime")
    ex.add_argument("model", help="a run directory, a model.pt, or an MLflow model URI")
    ex.add_argument("--onnx", required=True, help="the .onnx file to write (weights inside it, no .onnx.data)")
    ex.add_argument("--opset", type=int, default=18)
    ex.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the onnxruntime comparison against PyTorch")
    ex.set_defaults(run=_export)

    de = sub.add_parser("demo", help="synthetic corpus -> shards -> supervised training -> evaluation -> MLflow")
    de.add_argument("--out", default="demo", help="where the corpus, shards and runs go")
    de.add_argument("--steps", type=int, default=400)
    de.add_argument("--backbone", default="resnet18", choices=("tiny", "resnet18", "resnet34", "resnet50"))
    de.add_argument("--size", type=int, default=128, help="rendered frame width (realistic) or face side (classic)")
    de.add_argument("--style", choices=("realistic", "classic"), default="realistic",
                    help="realistic: head-and-shoulders frames with OpenFace landmark CSVs; classic: faces that "
                         "fill the image")
    de.add_argument("--align", type=int, default=64, help="aligned face side; 0 trains on whole frames")
    de.add_argument("--subjects", type=int, default=41)
    de.add_argument("--frames", type=int, default=40, help="frames per sequence (4 sequences per subject)")
    de.add_argument("--workers", type=int, default=2)
    de.set_defaults(run=_demo)

    ui = sub.add_parser("ui", help="open MLflow's UI on ssau's tracking store (http://127.0.0.1:5000)")
    ui.add_argument("--uri", default="sqlite:///mlflow.db", help="the store (tracking.uri of the runs)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(run=_ui)

    up = sub.add_parser("upload", help="send a run directory's tracking journal to MLflow: what its run misses, or "
                                       "everything to a new run on another server (running it twice sends nothing)")
    up.add_argument("run_dir", help="the run directory (holds tracking.jsonl)")
    up.add_argument("--uri", help="tracking server or database (default: the one the run logged to)")
    up.add_argument("--experiment", help="experiment for a run created on another server (default: the run's)")
    up.set_defaults(run=_upload)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        return args.run(args)
    except (UserError, LabelError, ShardError, ConfigError, InputError, *STOPS) as e:
        print(f"ssau: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the system refuses (missing, read-only, disk full): the path and why, one line
        print(f"ssau: error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssau: interrupted", file=sys.stderr)
        return 130
