"""Using what was trained (issue 24): `ssau predict` on folders, videos and shard directories against `ssau eval`'s
own scoring path, flagged rows, the MLflow pyfunc model (loaded and served), and the ONNX export."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (FACE_SUBJECTS, bp4d_with_landmarks, error_line, global_tracking_uri, model_artifacts,
                     openface_header, openface_row, tiny_train, write_csv)
from mlflow.tracking import MlflowClient

from ssau.cli import main
from ssau.data.eval_stream import eval_loader
from ssau.predict.faces import find_faces
from ssau.predict.inputs import video_rgb
from ssau.predict.model import load_recogniser, read_model
from ssau.shard.landmarks import landmark_rows

S1 = FACE_SUBJECTS[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BP4D look-alike with OpenFace CSVs, sharded to 48 px aligned faces, a tiny model trained on it (its MLflow
    model logged), and the raw frames of one sequence as photos with a FaceLandmarkImg-style CSV beside each."""
    tmp = tmp_path_factory.mktemp("predict")
    root = bp4d_with_landmarks(tmp / "BP4D", frames=6)
    shards = tmp / "shards"
    assert main(["shard", "bp4d", "--images", str(root), "--labels", str(root), "--landmarks", str(root / "landmarks"),
                 "--landmark-frames", "position", "--folds", "bp4d", "--align", "48", "--detector", "haar",
                 "--out", str(shards), "--quiet"]) == 0
    assert main(tiny_train(shards, tmp, "train.name=p", "train.steps=2", "tracking.register_as=au-tiny")) == 0
    photos = tmp / "photos"
    photos.mkdir()
    table = landmark_rows(root / "landmarks" / f"{S1}_T1.csv")
    for pos, src in enumerate(sorted((root / S1 / "T1").glob("*.jpg")), 1):
        shutil.copy(src, photos / src.name)
        write_csv(photos / f"{src.stem}.csv", openface_header(), [openface_row(1, np.array(table[pos][1]))])
    return {"tmp": tmp, "root": root, "shards": shards, "run": tmp / "runs" / "p", "photos": photos,
            "uri": f"sqlite:///{tmp / 'mlflow.db'}"}


def eval_probabilities(run: Path, shards: Path) -> dict[str, np.ndarray]:
    """key -> AU probabilities as `ssau eval` computes them (its loader, the model read as it reads it)."""
    method, cfg, aus, _ = read_model(run / "model.pt")
    out = {}
    with torch.no_grad():
        for b in eval_loader((str(shards),), None, aus, 8, cfg.data.image_size):
            p = method.predict(b.images).numpy()
            out |= {k: p[i] for i, k in enumerate(b.keys) if b.valid[i]}
    return out


def predicted(run, inputs, out: Path, *extra: str) -> pd.DataFrame:
    assert main(["predict", str(run), *map(str, inputs), "--out", str(out), "--quiet", *extra]) == 0
    return pq.read_table(out).to_pandas() if out.suffix == ".parquet" else pd.read_csv(out, keep_default_na=True)


def au_names(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("AU") and not c.endswith("_c")]


def test_folder_rows_match_eval_on_the_same_aligned_faces(trained, tmp_path):
    want = eval_probabilities(trained["run"], trained["shards"])
    df = predicted(trained["run"], [trained["photos"]], tmp_path / "p.csv", "--detector", "haar", "--workers", "2")
    assert list(df.columns[:10]) == ["input", "frame", "timestamp", "face_id", "confidence", "success", "face_x",
                                     "face_y", "face_width", "face_height"]
    assert df.columns[10] == "x_0" and df.columns[10 + 68] == "y_0" and df.columns[-1] == "problem"
    names = au_names(df)
    assert names == ["AU01", "AU02", "AU04", "AU06", "AU07", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24"]
    assert [f"{n}_c" for n in names] == [c for c in df.columns if c.endswith("_c")]
    assert len(df) == 6 and df["success"].eq(1).all() and df["input"].is_monotonic_increasing  # input order kept
    for _, r in df.iterrows():
        key = f"{S1}_T1_{int(Path(r['input']).stem):06d}"
        assert np.abs(r[names].to_numpy(float) - want[key]).max() < 1e-5, key
        assert all(r[f"{n}_c"] == int(r[n] >= 0.5) for n in names)  # no validation thresholds: 0.5
    assert np.isclose(df["confidence"], 0.98).all()  # the CSV's confidence


def test_shard_directory_rows_match_eval(trained, tmp_path):
    want = eval_probabilities(trained["run"], trained["shards"])
    df = predicted(trained["run"], [trained["shards"]], tmp_path / "s.parquet")
    assert len(df) == len(want) == 36
    for _, r in df.iterrows():
        d, key = r["input"].split("#")
        assert d == str(trained["shards"])
        assert np.abs(r[au_names(df)].to_numpy(float) - want[key]).max() < 1e-5
    assert df[["x_36", "y_36"]].notna().all().all()  # the stored landmarks, in the stored face's pixels


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as c:
        st = c.add_stream("mjpeg", rate=25)
        st.height, st.width = frames[0].shape[:2]
        st.pix_fmt = "yuvj420p"
        for arr in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)


def test_video_every_n_frames_with_a_landmark_csv_beside_it(trained, tmp_path):
    from PIL import Image

    seq = sorted((trained["root"] / S1 / "T2").glob("*.jpg"))
    write_video(tmp_path / "clip.avi", [np.asarray(Image.open(p).convert("RGB")) for p in seq])
    shutil.copy(trained["root"] / "landmarks" / f"{S1}_T2.csv", tmp_path / "clip.csv")
    df = predicted(trained["run"], [tmp_path / "clip.avi"], tmp_path / "v.csv", "--every", "2", "--detector", "haar")
    assert df["frame"].tolist() == [0, 2, 4] and df["success"].eq(1).all()
    assert np.allclose(df["timestamp"], [0.0, 0.08, 0.16])  # presentation times at 25 frames/s
    # the same frames in a bare loop: decoded here, aligned by the CSV's rows, scored by the model
    rec = load_recogniser(str(trained["run"]), "cpu")
    table = landmark_rows(tmp_path / "clip.csv")
    with av.open(str(tmp_path / "clip.avi")) as c:
        rgb = [video_rgb(f) for f in c.decode(video=0)]  # as ssau shard stores a video frame: through JPEG
    faces = [find_faces(rgb[i], rec.card["preprocess"], "haar", table[i + 1])[0] for i in (0, 2, 4)]
    want = rec.probabilities(torch.stack([f.image for f in faces])).numpy()
    assert np.abs(df[au_names(df)].to_numpy(float) - want).max() < 1e-6
    assert np.allclose(df["x_36"], [f.points[36][0] for f in faces])  # landmarks in frame pixels


def test_flagged_rows_no_face_not_media_fifo_and_bad_image(trained, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(trained["photos"], mixed)
    from PIL import Image

    Image.fromarray(np.full((120, 96, 3), 128, np.uint8)).save(mixed / "blank.jpg")  # no CSV: the detector finds none
    (mixed / "notes.txt").write_text("not a face")
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    os.mkfifo(mixed / "pipe.png")  # opened, it would block the worker forever
    df = predicted(trained["run"], [mixed], tmp_path / "m.csv", "--detector", "haar")
    flagged = df[df["success"] == 0].set_index(df[df["success"] == 0]["input"].map(lambda p: Path(p).name))
    assert flagged["problem"].to_dict() == {"blank.jpg": "no face", "notes.txt": "not an image or video",
                                            "pipe.png": "not a regular file",
                                            "broken.jpg": flagged.loc["broken.jpg", "problem"]}
    assert flagged.loc["broken.jpg", "problem"].startswith("unreadable image")
    assert flagged[au_names(df)].isna().all().all() and (df["success"] == 1).sum() == 6


@pytest.mark.parametrize("damage", [("thresholds", [2.0] * 12), ("image_size", "32"), ("image_size", 64),
                                    ("align_size", 48.7), ("quality", 0)])
def test_predict_refuses_a_bad_out_and_a_damaged_model_card(trained, tmp_path, capsys, damage):
    assert main(["predict", str(trained["run"]), str(trained["photos"]), "--out", str(tmp_path / "x.txt")]) == 2
    assert "a .csv or .parquet file" in error_line(capsys)
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    key, value = damage
    if key == "thresholds":
        state["card"]["thresholds"] = value
    elif key == "align_size":
        state["card"]["preprocess"]["align"]["size"] = value
    else:
        state["card"]["preprocess"][key] = value  # a string, a side other than the config's, a JPEG quality of 0
    torch.save(state, tmp_path / "model.pt")
    assert main(["predict", str(tmp_path / "model.pt"), str(trained["photos"]), "--out", str(tmp_path / "y.csv")]) == 2
    assert "model card holds values out of range or of the wrong type" in error_line(capsys)
    assert not (tmp_path / "y.csv").exists()


def test_shard_inputs_with_legacy_or_malformed_landmarks_and_a_fifo_shard(trained, tmp_path):
    from corpora import jpeg_bytes, write_tar

    from ssau.predict.inputs import FaceRows, Job

    tar = tmp_path / "crafted.tar"
    meta = {"aus": [1, 2], "occurrence": [1, 0], "mask": [1, 1]}
    write_tar(tar, [("legacy", jpeg_bytes(1, 48), {**meta, "landmarks": [[10, 10]] * 5}),  # pre-issue-11
                    ("bad", jpeg_bytes(2, 48), {**meta, "aligned": "landmarks", "landmarks": "x"})])
    pre = load_recogniser(str(trained["run"]), "cpu").card["preprocess"]
    rows = [r for chunk in FaceRows([Job("shard", str(tar))], pre, "haar") for r in chunk["rows"]]
    assert [(r["input"].split("#")[1], r["success"]) for r in rows] == [("legacy", 1), ("bad", 0)]
    assert rows[0]["points"] is None and rows[1]["problem"].startswith("unreadable sample")
    shards = tmp_path / "shards"
    shutil.copytree(trained["shards"], shards)
    first = sorted(shards.glob("*.tar"))[0]
    first.unlink()
    os.mkfifo(first)  # listed in dataset.json; opening it would block forever
    df = predicted(trained["run"], [shards], tmp_path / "f.csv")
    flagged = df[df["success"] == 0]
    assert flagged["problem"].tolist() == ["shard is not a regular file"] and flagged["input"].tolist() == [str(first)]
    listed = json.loads((shards / "dataset.json").read_text())["shards"]
    assert (df["success"] == 1).sum() == 36 - next(sh["samples"] for sh in listed if sh["name"] == first.name)


def test_logging_the_mlflow_model_keeps_the_process_tracking_uri(trained, tmp_path, monkeypatch):
    from ssau.predict.mlflow_log import log_model

    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)  # unset, whatever another test of this process left pinned
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "a")))
    state = torch.load(trained["run"] / "model.pt", weights_only=True)
    assert log_model(trained["run"] / "model.pt", state["card"], tuple(state["aus"]), run.info.run_id, uri)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
    assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"  # the variable applies again, nothing pinned


def logged_model(trained) -> str:
    client = MlflowClient(trained["uri"])
    run_id = json.loads((trained["run"] / "tracking.jsonl").read_text().splitlines()[0])["run_id"]
    arts = model_artifacts(client, run_id)
    assert {"model/model.pt", "model/MLmodel", "model/mlflow_entry.py"} <= arts  # the weights, and the pyfunc
    assert not any(p.endswith(".pkl") for p in arts)  # logged from code: no pickled object to unpickle
    return run_id


def shard_faces(shards: Path, n: int) -> dict[str, str]:
    import tarfile

    out = {}
    with tarfile.open(sorted(shards.glob("*.tar"))[0]) as t:
        for m in t.getmembers():
            if m.name.endswith(".jpg") and len(out) < n:
                out[m.name[:-4]] = base64.b64encode(t.extractfile(m).read()).decode()
    return out


def test_mlflow_model_loads_and_predicts_like_eval(trained, tmp_path, monkeypatch):
    run_id = logged_model(trained)
    want = eval_probabilities(trained["run"], trained["shards"])
    faces = shard_faces(trained["shards"], 4)
    with global_tracking_uri(trained["uri"]):
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert [c.name for c in model.metadata.signature.inputs.inputs] == ["image", "aligned"]
    photo = base64.b64encode((sorted(trained["photos"].glob("*.jpg"))[0]).read_bytes()).decode()
    got = model.predict(pd.DataFrame({"image": [*faces.values(), photo, "***"],
                                      "aligned": [True] * len(faces) + [False, False]}))
    names = au_names(got)
    for i, key in enumerate(faces):
        assert np.abs(got.loc[i, names].to_numpy(float) - want[key]).max() < 1e-5
    assert got["success"].tolist() == [1] * len(faces) + [1, 0] and got.loc[len(faces) + 1, "problem"] != ""
    # ssau predict reads the same model from its URI (model.pt with weights_only, not the pyfunc's code)
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)  # as in a fresh process: MLFLOW_TRACKING_URI names the store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    a = predicted(f"runs:/{run_id}/model", [trained["photos"]], tmp_path / "a.csv", "--detector", "haar")
    b = predicted(trained["run"], [trained["photos"]], tmp_path / "b.csv", "--detector", "haar")
    c = predicted("models:/au-tiny/1", [trained["photos"]], tmp_path / "c.csv", "--detector", "haar")  # registered
    assert np.array_equal(a[names].to_numpy(), b[names].to_numpy()) and np.array_equal(c[names], b[names])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_same_values(trained):
    run_id = logged_model(trained)
    want = eval_probabilities(trained["run"], trained["shards"])
    faces = shard_faces(trained["shards"], 3)
    port = _free_port()
    bindir = str(Path(sys.executable).parent)
    env = os.environ | {"MLFLOW_TRACKING_URI": trained["uri"], "PATH": bindir + os.pathsep + os.environ["PATH"]}
    log = open(trained["tmp"] / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (trained["tmp"] / "serve.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer /ping in 120 s"
                time.sleep(1)
        body = json.dumps({"dataframe_split": {"columns": ["image", "aligned"],
                                               "data": [[v, True] for v in faces.values()]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                     {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        for row, key in zip(answer, faces):
            got = np.array([row[k] for k in sorted(row) if k.startswith("AU") and not k.endswith("_c")])
            assert np.abs(got - want[key]).max() < 1e-5
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def test_onnx_export_matches_pytorch(trained, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime", reason="the [export] extra (onnxruntime) is not installed")
    out = tmp_path / "m.onnx"
    assert main(["export", str(trained["run"]), "--onnx", str(out)]) == 0
    assert "onnxruntime vs PyTorch: max |diff|" in capsys.readouterr().out
    assert out.is_file() and not list(tmp_path.glob("*.onnx.data")) and not list(tmp_path.glob(".m.onnx*"))
    rec = load_recogniser(str(trained["run"]), "cpu")
    faces = torch.stack([find_faces(np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB")),
                                    rec.card["preprocess"], "haar")[0].image
                         for p in sorted(trained["photos"].glob("*.jpg"))[:3]] * 3)  # a batch of 9
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": faces.numpy()})[0]
    assert got.shape == (9, 12) and np.abs(got - rec.probabilities(faces).numpy()).max() < 1e-4
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["ssau.card"])["preprocess"]["align"]["size"] == 48


def test_validation_thresholds_travel_with_the_model(trained, tmp_path):
    tmp = tmp_path
    assert main(tiny_train(trained["shards"], tmp, "train.name=v", "train.steps=2", "data.validation=0.3",
                           "train.thresholds=val", "tracking.enabled=false")) == 0
    card = torch.load(tmp / "runs" / "v" / "model.pt", weights_only=True)["card"]
    assert card["thresholds_from"].startswith("validation split") and len(card["thresholds"]) == 12
    assert card["preprocess"] == {"align": {"size": 48, "margin": 0.15, "points": "five"}, "quality": 95,
                                  "faces_from": "landmarks", "image_size": 32, "resize_ratio": 1.143}
    df = predicted(tmp / "runs" / "v", [trained["photos"]], tmp_path / "t.csv", "--detector", "haar")
    for n, t in zip(au_names(df), card["thresholds"]):
        assert (df[f"{n}_c"] == (df[n] >= t).astype(int)).all()
    assert any(t != 0.5 for t in card["thresholds"])


def test_a_damaged_dataset_json_costs_the_card_its_alignment_not_the_run(tmp_path):
    from ssau.config import Config
    from ssau.train.model_card import card_of_config

    (tmp_path / "dataset.json").write_text(json.dumps({"faces": {"align": {"size": 64}}, "settings": "x"}))
    cfg = Config()
    cfg.data.labelled = [str(tmp_path)]
    card = card_of_config(cfg)
    assert card["preprocess"]["align"] is None and card["preprocess"]["faces_from"] == "frames"
    (tmp_path / "dataset.json").write_text(json.dumps({"faces": {"align": {"size": 64, "margin": 0.1, "points": "all"},
                                                                 "aligned_by": {"detector": 9, "landmarks": 3}}}))
    assert card_of_config(cfg)["preprocess"]["align"] == {"size": 64, "margin": 0.1, "points": "all"}
    assert card_of_config(cfg)["preprocess"]["faces_from"] == "box"  # mostly Haar boxes: predict's auto takes Haar


def test_auto_detector_follows_how_the_training_faces_were_aligned(monkeypatch):
    from ssau.errors import UserError
    from ssau.predict.faces import choose_detector

    pre = {"align": {"size": 48, "margin": 0.15, "points": "five"}, "faces_from": "landmarks"}
    monkeypatch.setattr("ssau.faces.detect.available", lambda: True)
    assert choose_detector("auto", pre) == ("dlib", "")
    assert choose_detector("auto", pre | {"faces_from": "box"}) == ("haar", "")  # trained on Haar boxes
    assert choose_detector("haar", pre) == ("haar", "")
    monkeypatch.setattr("ssau.faces.detect.available", lambda: False)
    detector, note = choose_detector("auto", pre)
    assert detector == "haar" and "[faces] extra" in note
    with pytest.raises(UserError, match=r"\[faces\] extra"):
        choose_detector("dlib", pre)
