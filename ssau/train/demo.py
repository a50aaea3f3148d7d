"""`ssau demo`: the whole path on a synthetic corpus that ssau renders itself (render, shard with alignment,
train, evaluate, log). Apart from the other commands because it alone needs the renderer and the shard writer
(and OpenCV with them)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from ssau.errors import ConfigError, ShardError
from ssau.io import atomic_write
from ssau.metrics import format_table
from ssau.shard.plan import run_shard
from ssau.shard.write import ShardSettings
from ssau.synth.corpus import render_corpus
from ssau.synth.faces import SynthSettings
from ssau.train.commands import ssau_command
from ssau.train.setup import load_run_config
from ssau.train.trainer import Trainer


def demo(out: str, steps: int, backbone: str, size: int, subjects: int, frames: int, workers: int,
         style: str = "realistic", align: int = 64) -> dict:
    """Render the synthetic corpus, shard it through the real adapters (aligning faces with the OpenFace landmark
    CSVs it writes), train the supervised baseline on folds 2+3, evaluate on fold 1, log to the local MLflow store
    and print the per-AU table."""
    root = Path(out).resolve()
    corpus, shards = root / "corpus", root / "shards"
    scale = subjects / 41  # a smaller demo renders fewer extra images too: 500 expression, 1000 unlabelled at 41
    synth = SynthSettings(subjects=subjects, tasks=4, frames=frames, size=size,
                          expression_images=max(10, round(500 * scale)), unlabelled=max(10, round(1000 * scale)),
                          style=style)
    marker = corpus / "synth.json"  # a corpus rendered with other settings is rendered anew
    if corpus.exists() and not marker.is_file():
        raise ConfigError(f"{corpus} exists but was not rendered by ssau demo (no {marker.name}): move it, or "
                          f"give another --out")
    if not marker.is_file() or json.loads(marker.read_text()) != dataclasses.asdict(synth):
        if corpus.exists():
            shutil.rmtree(corpus)  # the demo's own corpus, rendered with other settings
        print(render_corpus(corpus, synth, workers=workers))
        atomic_write(marker, json.dumps(dataclasses.asdict(synth)).encode())
    landmarks = corpus / "bp4d" / "landmarks"
    faces = dict(align=align or None)
    bp4d_faces = dict(faces, landmarks=str(landmarks), landmark_frames="position") if landmarks.is_dir() else faces
    jobs = [("bp4d", corpus / "bp4d", corpus / "bp4d", "bp4d", bp4d_faces),
            ("rafdb", corpus / "rafdb", None, None, {}),  # RAF-DB's "aligned" images are aligned already
            ("folder", corpus / "unlabelled", None, None, faces)]
    for fmt, images, labels, folds, extra in jobs:
        settings = ShardSettings(format=fmt, images=str(images), labels=str(labels) if labels else None,
                                 folds=folds, shard_size=250, **extra)
        try:
            doc = run_shard(settings, shards / fmt, workers=workers)
        except ShardError as e:  # shards of an earlier demo with other settings: the demo owns its directory
            if "other settings" not in str(e):
                raise
            doc = run_shard(settings, shards / fmt, workers=workers, overwrite=True)
        how = ", ".join(f"{n} by {k}" for k, n in doc["faces"]["aligned_by"].items())
        print(f"sharded {fmt}: {doc['samples']} samples in {len(doc['shards'])} shards -> {shards / fmt}"
              + (f" (aligned to {align} px: {how})" if extra.get("align") else ""))
    uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    overrides = [f"data.labelled=[{shards / 'bp4d'}]", "data.fold=1", f"data.image_size={min(align or size, 64)}",
                 "data.m1=32", f"data.workers={workers}", f"model.backbone={backbone}", f"train.steps={steps}",
                 f"train.out={root / 'runs'}", f"train.checkpoint_every={steps}", "train.log_every=10",
                 f"tracking.uri={uri}", "tracking.experiment=ssau-demo", "optim.lr=0.002"]
    cfg = load_run_config(None, overrides)
    trainer = Trainer(cfg)
    metrics = trainer.fit()
    if trainer.rt.main:
        what = f"{align} px faces aligned by landmarks" if align else "whole frames"
        print(f"\nsupervised {backbone}, {steps} steps on {what} ({style} corpus), trained on folds 2+3, "
              f"evaluated on fold 1 (per-AU, %):")
        print(format_table(metrics))
        print(f"\nMLflow run {trainer.run_id} in experiment 'ssau-demo'. Open it with:\n"
              f"  {ssau_command()} ui --uri {uri}\n"
              f"then http://127.0.0.1:5000/#/experiments?workflowType=machine_learning in a browser\n"
              f"Use the model on your own images or videos:\n"
              f"  {ssau_command()} predict {trainer.run_dir} PHOTOS_OR_VIDEOS --out au.csv")
    return metrics

