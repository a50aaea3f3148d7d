"""Using a trained model: `python -m ssau.bench.predict MODEL [--frames 240] [--size 256] [--rounds 3]`.

MODEL is a run directory or a model.pt (`ssau demo`'s run, say). Every figure comes from one run, rounds
interleaved, medians reported, and is also given as a ratio:
  predict   `ssau predict`'s pipeline (PyAV decoding and face alignment in a DataLoader worker, batches of 64; also
            with --workers 0, everything in one process) on a video of realistic synthetic frames with an OpenFace
            CSV beside it, against a bare loop over the same video in one process (decode, JPEG round trip as the
            sharder does, align by the same CSV rows, the model at the same batch): frames/s of each and the
            pipeline's ratio to the loop; also `ssau predict` with dlib's detector instead of the CSV ([faces])
  serve     `mlflow models serve --env-manager local` on 127.0.0.1 answering requests of 32 aligned faces:
            requests/s and faces/s, against the same pyfunc model's predict called in-process
  onnx      onnxruntime's CPU provider against PyTorch on the same batches of 32 faces: ms per batch, the ratio
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ssau.faces import detect
from ssau.predict.command import predict
from ssau.predict.export import Recognition, export_onnx
from ssau.predict.faces import find_faces
from ssau.predict.inputs import video_rgb
from ssau.predict.mlflow_log import log_model
from ssau.predict.model import load_recogniser, model_file, read_model
from ssau.shard.landmarks import landmark_rows
from ssau.synth.corpus import render_corpus
from ssau.synth.faces import SynthSettings
from ssau.train.model_card import card_of_config


def _video(work: Path, frames: int, size: int) -> Path:
    import av
    from PIL import Image


    render_corpus(work / "corpus", SynthSettings(subjects=1, tasks=1, frames=frames, size=size, expression_images=0,
                                                 unlabelled=0, style="realistic"), workers=2, progress=False)
    bp4d = work / "corpus" / "bp4d"
    jpgs = sorted(p for p in bp4d.rglob("*.jpg"))
    video = work / "clip.avi"
    with av.open(str(video), "w") as c:
        st = c.add_stream("mjpeg", rate=25)
        st.height, st.width = np.asarray(Image.open(jpgs[0])).shape[:2]
        st.pix_fmt = "yuvj420p"
        for p in jpgs:
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.asarray(Image.open(p).convert("RGB")), "rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    shutil.copy(next((bp4d / "landmarks").glob("*.csv")), work / "clip.csv")  # rows by position: frame i + 1
    return video


def _bare_loop(rec, video: Path, csv: Path, batch: int) -> float:
    import av


    t = time.perf_counter()
    table, pre, pending, n = landmark_rows(csv), rec.card["preprocess"], [], 0
    with av.open(str(video)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            pending += [f.image for f in find_faces(video_rgb(frame), pre, "haar", table.get(i + 1))]
            n += 1
            if len(pending) >= batch:
                rec.probabilities(torch.stack(pending))
                pending = []
    if pending:
        rec.probabilities(torch.stack(pending))
    return n / (time.perf_counter() - t)


def bench_predict(model: str, work: Path, frames: int, size: int, rounds: int) -> dict:
    video = _video(work, frames, size)
    rec = load_recogniser(model, "cpu")
    bare, piped, inline, dlib = [], [], [], []
    for r in range(rounds):
        bare.append(_bare_loop(rec, video, work / "clip.csv", 64))
        piped.append(predict(model, [str(video)], str(work / f"p{r}.csv"), workers=1, detector="haar", device="cpu",
                             progress=False)["frames_per_s"])
        inline.append(predict(model, [str(video)], str(work / f"i{r}.csv"), workers=0, detector="haar", device="cpu",
                              progress=False)["frames_per_s"])
        if detect.available():
            nocsv = work / "nocsv"
            nocsv.mkdir(exist_ok=True)
            shutil.copy(video, nocsv / video.name)
            dlib.append(predict(model, [str(nocsv / video.name)], str(work / f"d{r}.csv"), workers=1, detector="dlib",
                                device="cpu", progress=False)["frames_per_s"])
    med = statistics.median
    out = {"frames": frames, "frame_size": f"{size}x{round(size * 1.25)}", "rounds": rounds,
           "bare_loop_frames_s": med(bare), "predict_csv_frames_s": med(piped),
           "predict_vs_bare": med(piped) / med(bare), "predict_workers0_frames_s": med(inline),
           "predict_workers0_vs_bare": med(inline) / med(bare)}
    if dlib:
        out |= {"predict_dlib_frames_s": med(dlib), "predict_dlib_vs_bare": med(dlib) / med(bare)}
    return out


def _faces_b64(rec, n: int) -> list[str]:
    import base64
    import io

    from PIL import Image

    side = (rec.card["preprocess"]["align"] or {}).get("size") or rec.card["preprocess"]["image_size"]
    g = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(g.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def bench_serve(model: str, work: Path, rounds: int, requests: int = 20) -> dict:
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient


    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("bench", artifact_location=str(work / "artifacts")))
    path = model_file(model, work)  # a run directory or a model.pt here
    _, cfg, aus, state = read_model(path)
    log_model(path, state.get("card") or card_of_config(cfg), aus, run.info.run_id, uri)
    rec = load_recogniser(model, "cpu")
    faces = _faces_b64(rec, 32)
    frame = pd.DataFrame({"image": faces, "aligned": [True] * 32})
    mlflow.set_tracking_uri(uri)
    local = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    port = _free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": uri,
                        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run.info.run_id}/model",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait(port)
        body = json.dumps({"dataframe_split": {"columns": ["image", "aligned"],
                                               "data": [[f, True] for f in faces]}}).encode()
        served, inproc = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(requests):
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                             {"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=60).read()
            served.append(requests / (time.perf_counter() - t))
            t = time.perf_counter()
            for _ in range(requests):
                local.predict(frame)
            inproc.append(requests / (time.perf_counter() - t))
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
    med = statistics.median
    return {"batch": 32, "requests": requests, "served_requests_s": med(served), "served_faces_s": 32 * med(served),
            "in_process_requests_s": med(inproc), "served_vs_in_process": med(served) / med(inproc)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer on port {port} in {seconds:.0f} s") from None
            time.sleep(0.5)


def bench_onnx(model: str, work: Path, rounds: int, batches: int = 20) -> dict:
    import onnxruntime as ort


    out = work / "m.onnx"
    export_onnx(model, out)
    rec = load_recogniser(model, "cpu")
    size = rec.card["preprocess"]["image_size"]
    x = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    module = Recognition(rec.method).eval()
    pt, ox = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        with torch.no_grad():
            for _ in range(batches):
                want = module(x)
        pt.append((time.perf_counter() - t) / batches * 1000)
        t = time.perf_counter()
        for _ in range(batches):
            got = session.run(None, {"images": x.numpy()})[0]
        ox.append((time.perf_counter() - t) / batches * 1000)
    med = statistics.median
    return {"batch": 32, "image_size": size, "pytorch_ms": med(pt), "onnxruntime_ms": med(ox),
            "onnxruntime_vs_pytorch": med(ox) / med(pt), "max_abs_diff": float(np.abs(got - want.numpy()).max()),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run directory or a model.pt")
    p.add_argument("--frames", type=int, default=240)
    p.add_argument("--size", type=int, default=256, help="video frame width (height = 1.25 x width)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default="predict,serve,onnx")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ssau-bench-predict-"))
    try:
        out = {}
        for name, fn in (("predict", lambda: bench_predict(a.model, work, a.frames, a.size, a.rounds)),
                         ("serve", lambda: bench_serve(a.model, work, a.rounds)),
                         ("onnx", lambda: bench_onnx(a.model, work, a.rounds))):
            if name in a.only.split(","):
                out[name] = fn()
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
