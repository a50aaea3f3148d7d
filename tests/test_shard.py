"""`ssau shard`: every adapter on small trees, bad input, determinism across workers, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
from corpora import BP4D_SUBJECTS, jpeg_bytes, write_bp4d
from helpers import samples_of, shard, tree_bytes
from PIL import Image

from ssau.aus import STANDARD_AUS, STANDARD_FOLDS
from ssau.cli import main
from ssau.faces.template import MEAN_68


def test_bp4d_labels_unknowns_folds_and_passthrough(tmp_path, capsys):
    root = tmp_path / "BP4D"
    labels = write_bp4d(root)
    # A label row without an image and an image without a label row.
    missing = sorted(k for k in labels if k[0] == "F001" and k[1] == "T1")[-1]
    (root / "F001" / "T1" / f"{missing[2]:04d}.jpg").unlink()
    (root / "M007" / "T2" / "9999.jpg").write_bytes(jpeg_bytes(5))
    out = tmp_path / "out"
    assert shard("bp4d", "--images", str(root), "--labels", str(root), "--out", str(out), "--folds", "bp4d",
                 "--shard-size", "4") == 0
    assert "skipped" in capsys.readouterr().out

    doc = json.loads((out / "dataset.json").read_text())
    assert doc["aus"] == [f"AU{a:02d}" for a in STANDARD_AUS["bp4d"]]  # AU43 (all 9) is not in the standard set
    assert doc["skipped_by_reason"] == {"image-without-label": 1, "label-without-image": 1}
    assert doc["samples"] == len(labels) - 1

    got = samples_of(out)
    assert len(got) == len(labels) - 1
    part = {s: k + 1 for k, subs in enumerate(STANDARD_FOLDS["bp4d"]) for s in subs}
    for (s, t, f), row in labels.items():
        if (s, t, f) == missing:
            continue
        meta = got[f"{s}_{t}_{f:06d}"]["json"]
        assert meta["fold"] == part[s] and meta["subject"] == s and meta["sequence"] == t and meta["frame"] == f
        for j, au in enumerate(meta["aus"]):
            assert meta["mask"][j] == (0 if row[au] == 9 else 1)  # 9 = not coded, masked ...
            assert meta["occurrence"][j] == {1: 1, 0: 0, 9: -1}[row[au]]  # ... and stored as unknown, never positive
        # Valid RGB JPEGs are passed through byte for byte.
        assert got[f"{s}_{t}_{f:06d}"]["jpg"] == (root / s / t / f"{f:04d}.jpg").read_bytes()

    # Each fold lives in its own shards; the index agrees with the shards and with the unknown counts.
    idx = pq.read_table(out / "index.parquet").to_pylist()
    assert len(idx) == doc["samples"]
    for row in idx:
        assert row["shard"].startswith(f"bp4d-fold{row['fold']}-")
        assert row["fold"] == part[row["subject"]]
    au04 = [r["AU04"] for r in idx]
    assert doc["au_counts"]["AU04"] == {"positive": au04.count(1), "negative": au04.count(0),
                                        "unknown": au04.count(-1)}
    assert au04.count(-1) > 0
    for s in doc["shards"]:
        import hashlib
        assert hashlib.sha256((out / s["name"]).read_bytes()).hexdigest() == s["sha256"]


def test_bad_images_are_converted_or_skipped_never_fatal(tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    good = jpeg_bytes(1)
    cases = {
        "good.jpg": good,
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "text.jpg": b"this is not an image at all\n" * 10,
        "cmyk.jpg": jpeg_bytes(2, mode="CMYK"),
        "gray.jpg": jpeg_bytes(3, mode="L"),
        "alpha.png": jpeg_bytes(4, mode="RGBA", fmt="PNG"),
        "tiny.png": jpeg_bytes(6, size=4, fmt="PNG"),
    }
    for name, data in cases.items():
        (root / name).write_bytes(data)
    out = tmp_path / "out"
    assert shard("folder", "--images", str(root), "--out", str(out)) == 0
    doc = json.loads((out / "dataset.json").read_text())
    reasons = {Path(x["input"]).name: x["reason"] for x in doc["skipped"]}
    assert reasons == {"truncated.jpg": "truncated", "empty.jpg": "empty-file", "text.jpg": "not-an-image",
                       "tiny.png": "too-small"}
    assert doc["converted_by_reason"] == {"mode-CMYK": 1, "mode-L": 1, "mode-RGBA": 1}
    got = samples_of(out)
    assert sorted(got) == ["alpha", "cmyk", "good", "gray"]
    for key, sample in got.items():
        img = Image.open(__import__("io").BytesIO(sample["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB", key
    assert got["good"]["jpg"] == good


def test_malformed_label_file_stops_with_one_line_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "BP4D"
    write_bp4d(root)
    csv = root / "AUCoding" / "AU_OCC" / "M007_T2.csv"
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].replace(",1,", ",7,", 1) if ",1," in lines[3] else lines[3].replace(",0,", ",7,", 1)
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert shard("bp4d", "--images", str(root), "--labels", str(root), "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{csv}:4:" in err[0] and "7" in err[0]
    assert not out.exists()


def test_other_settings_are_refused_unless_overwrite(tmp_path, capsys):
    root = tmp_path / "BP4D"
    write_bp4d(root, frames=2)
    out = tmp_path / "out"
    common = ["bp4d", "--images", str(root), "--labels", str(root), "--out", str(out)]
    assert shard(*common, "--shard-size", "5") == 0
    before = sorted(p.name for p in out.glob("*.tar"))
    assert shard(*common, "--shard-size", "7") == 2
    assert "shard_size" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.tar")) == before
    assert shard(*common, "--shard-size", "7", "--overwrite") == 0
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["settings"]["shard_size"] == 7
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["name"] for s in doc["shards"])


def test_output_is_byte_identical_for_1_and_3_workers(tmp_path):
    root = tmp_path / "BP4D"
    write_bp4d(root, frames=6)
    trees = []
    for w in (1, 3):
        out = tmp_path / f"out{w}"
        assert shard("bp4d", "--images", str(root), "--labels", str(root), "--out", str(out), "--folds", "bp4d",
                     "--shard-size", "5", "--resize", "24", "--workers", str(w)) == 0
        trees.append(tree_bytes(out))
    assert len([k for k in trees[0] if k.endswith(".tar")]) >= 6
    assert trees[0] == trees[1]


def test_resume_after_kill_9(tmp_path):
    root = tmp_path / "faces"
    for i in range(240):
        (root / f"d{i // 40}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i // 40}" / f"{i:04d}.png").write_bytes(jpeg_bytes(i, size=48, fmt="PNG"))
    args = ["-m", "ssau", "shard", "folder", "--images", str(root), "--shard-size", "6", "--quiet",
            "--workers", "2"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, *args, "--out", str(ref)], check=True)

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *args, "--out", str(out)])
    deadline = time.time() + 60
    while len(list((out / ".ssau").glob("*.json"))) < 8 and time.time() < deadline:  # settings.json + 7 shards
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for child in subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split():
        os.kill(int(child), signal.SIGKILL)  # pool workers orphaned by the kill
    assert not (out / "dataset.json").exists(), "killed too late to test resume"

    res = subprocess.run([sys.executable, *args, "--out", str(out)], capture_output=True, text=True, check=True)
    assert "verified and kept" in res.stdout
    kept = int(res.stdout.split("written, ")[1].split(" verified")[0])
    assert kept >= 6
    assert tree_bytes(out) == tree_bytes(ref)  # no duplicate, no missing sample, same bytes
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    keys = pq.read_table(out / "index.parquet", columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 240


def test_disfa_from_video_and_from_frames(tmp_path):
    labels = tmp_path / "ActionUnit_Labels"
    videos = tmp_path / "Videos_LeftCamera"
    frames_dir = tmp_path / "frames"
    videos.mkdir()
    n_frames = 6
    for sn in ("SN001", "SN002"):
        (labels / sn).mkdir(parents=True)
        for au in STANDARD_AUS["disfa"]:
            # 8 label rows, but the video has only 6 frames: rows 7-8 are labels without frames.
            rows = [f"{f},{(f + au) % 6}" for f in range(1, 9)]
            (labels / sn / f"{sn}_au{au}.txt").write_text("\n".join(rows) + "\n")
        with av.open(str(videos / f"LeftVideo{sn}_comp.avi"), "w") as c:
            st = c.add_stream("mjpeg", rate=25)
            st.width = st.height = 32
            st.pix_fmt = "yuvj420p"
            for f in range(n_frames):
                arr = np.full((32, 32, 3), 40 * f, dtype=np.uint8)
                for pkt in st.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                    c.mux(pkt)
            for pkt in st.encode():
                c.mux(pkt)
        (frames_dir / sn).mkdir(parents=True)
        for f in range(1, n_frames + 1):
            (frames_dir / sn / f"{f:05d}.jpg").write_bytes(jpeg_bytes(f))

    out_v = tmp_path / "out_v"
    assert shard("disfa", "--images", str(videos), "--labels", str(tmp_path), "--out", str(out_v)) == 0
    doc = json.loads((out_v / "dataset.json").read_text())
    assert doc["samples"] == 2 * n_frames and doc["skipped_by_reason"] == {"frame-not-in-video": 4}
    got = samples_of(out_v)
    meta = got["SN001_000003"]["json"]
    assert meta["intensity"] == [float((3 + au) % 6) for au in STANDARD_AUS["disfa"]]
    assert meta["occurrence"] == [int((3 + au) % 6 >= 2) for au in STANDARD_AUS["disfa"]]  # active = intensity >= 2
    # Frame 3 (1-based) is the third decoded frame: its mean grey level is 40 * 2.
    level = np.asarray(Image.open(__import__("io").BytesIO(got["SN001_000003"]["jpg"]))).mean()
    assert abs(level - 80) < 6

    out_f = tmp_path / "out_f"
    assert shard("disfa", "--images", str(frames_dir), "--labels", str(labels), "--out", str(out_f),
                 "--frame-template", "{subject}/{frame:05d}.jpg", "--folds", "disfa") == 0
    doc = json.loads((out_f / "dataset.json").read_text())
    assert doc["samples"] == 2 * n_frames and doc["skipped_by_reason"] == {"label-without-image": 4}
    assert {s["fold"] for s in doc["shards"]} == {1}  # SN001 and SN002 are both in part 1


def test_emotionet_csv_rafdb_folder(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    # EmotioNet: URL basenames map to local files; 999 = unknown.
    lines = []
    for i in range(4):
        (img / f"face {i}.jpg").write_bytes(jpeg_bytes(i))
        vals = ["999" if (au == 5 and i == 0) else str((i + au) % 2) for au in range(1, 61)]
        lines.append(f"http://x.org/a/face%20{i}.jpg http://y.org/{i}.jpg " + " ".join(vals))
    lines.append("http://x.org/a/gone.jpg http://y.org/gone.jpg " + " ".join(["0"] * 60))
    (tmp_path / "emo.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "emo"
    assert shard("emotionet", "--images", str(img), "--labels", str(tmp_path / "emo.txt"), "--out", str(out)) == 0
    got = samples_of(out)
    assert len(got) == 4
    m = got["face-0"]["json"]
    j5 = m["aus"].index(5)
    assert m["mask"][j5] == 0 and m["mask"][m["aus"].index(1)] == 1
    assert json.loads((out / "dataset.json").read_text())["skipped_by_reason"] == {"label-without-image": 1}

    # CSV manifest: AU columns named AU1 / AU02 / 4, unknown marker -1, expression by name.
    (tmp_path / "m.csv").write_text("image,subject,AU1,AU02,4,expression\n"
                                    "face 0.jpg,s1,1,0,-1,happiness\nface 1.jpg,s2,0,1,1,\n")
    out = tmp_path / "csv"
    assert shard("csv", "--images", str(img), "--labels", str(tmp_path / "m.csv"), "--out", str(out),
                 "--unknown", "-1") == 0
    got = samples_of(out)
    assert got["face-0"]["json"]["aus"] == [1, 2, 4]
    assert got["face-0"]["json"]["mask"] == [1, 1, 0] and got["face-0"]["json"]["expression_name"] == "happiness"
    (tmp_path / "bad.csv").write_text("image,AU1\nface 0.jpg,2\n")
    assert shard("csv", "--images", str(img), "--labels", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "b")) == 2

    # RAF-DB: split from the name prefix, labels 1-7 -> 0-6, aligned file names.
    raf = tmp_path / "basic"
    (raf / "Image" / "aligned").mkdir(parents=True)
    (raf / "EmoLabel").mkdir()
    for name in ("train_00001", "train_00002", "test_0001"):
        (raf / "Image" / "aligned" / f"{name}_aligned.jpg").write_bytes(jpeg_bytes(len(name)))
    (raf / "EmoLabel" / "list_patition_label.txt").write_text("train_00001.jpg 4\ntrain_00002.jpg 7\ntest_0001.jpg 1\n")
    out = tmp_path / "raf"
    assert shard("rafdb", "--images", str(raf / "Image" / "aligned"), "--labels",
                 str(raf / "EmoLabel" / "list_patition_label.txt"), "--out", str(out)) == 0
    got = samples_of(out)
    assert got["train_00001"]["json"]["expression_name"] == "happiness"
    assert got["train_00002"]["json"]["expression"] == 6 and got["test_0001"]["json"]["split"] == "test"
    assert sorted(p.name for p in out.glob("*.tar")) == ["rafdb-test-000000.tar", "rafdb-train-000000.tar"]

    # Folder with MegaFace sidecars, and --folds K for subject-less images. Landmarks are kept when there are 68
    # (stored) or 5 (alignment points); other counts are ignored with a note, the box kept.
    (img / "face 1.jpg.json").write_text(json.dumps({"bounding_box": {"x": 1, "y": 2, "width": 20, "height": 22},
                                                     "landmarks": {"0": {"x": 5, "y": 6}, "1": {"x": 7, "y": 8}}}))
    (img / "face 2.jpg.json").write_text("{not json")
    lm68 = {str(i): {"x": round(2 + 28 * x, 2), "y": round(2 + 28 * y, 2)} for i, (x, y) in enumerate(MEAN_68)}
    (img / "face 3.jpg.json").write_text(json.dumps({"landmarks": lm68}))
    out = tmp_path / "folder"
    assert shard("folder", "--images", str(img), "--out", str(out), "--folds", "3") == 0
    got = samples_of(out)
    assert got["face-1"]["json"]["bbox"] == [1.0, 2.0, 20.0, 22.0]
    assert got["face-1"]["json"]["landmarks"] == []  # schema version 2: an empty list, not a missing key
    assert got["face-3"]["json"]["landmarks"] == [[lm68[str(i)]["x"], lm68[str(i)]["y"]] for i in range(68)]
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["skipped_by_reason"] == {"bad-sidecar-ignored": 2} and doc["samples"] == 4
    assert doc["faces"]["landmarks"]["stored"] == 1 and doc["faces"]["aligned_by"] == {"none": 4}


def test_unknown_format_and_missing_input_are_one_line_errors(tmp_path, capsys):
    assert shard("nosuch", "--images", str(tmp_path), "--out", str(tmp_path / "o")) == 2
    assert shard("bp4d", "--images", str(tmp_path / "absent"), "--labels", str(tmp_path), "--out",
                 str(tmp_path / "o")) == 2
    assert shard("bp4d", "--images", str(tmp_path), "--labels", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--aus", "1,AU2,elbow") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "unknown format 'nosuch'" in err[0] and "absent" in err[1]
    assert "--aus" in err[2] and "'elbow'" in err[2]


def test_synthetic_corpus_goes_through_the_real_adapters(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "syn"), "--subjects", "6", "--tasks", "3", "--frames", "24",
                 "--expression-images", "30", "--unlabelled", "20", "--size", "48", "--quiet"]) == 0
    syn = tmp_path / "syn"
    assert shard("bp4d", "--images", str(syn / "bp4d"), "--labels", str(syn / "bp4d"), "--out",
                 str(tmp_path / "b"), "--folds", "bp4d") == 0
    assert shard("rafdb", "--images", str(syn / "rafdb/basic/Image/aligned"), "--labels",
                 str(syn / "rafdb/basic/EmoLabel/list_patition_label.txt"), "--out", str(tmp_path / "r")) == 0
    assert shard("folder", "--images", str(syn / "unlabelled"), "--out", str(tmp_path / "u")) == 0
    labelled = {line.split()[0] for line in (syn / "rafdb/basic/EmoLabel/list_patition_label.txt").read_text().splitlines()}
    ambiguous = (syn / "rafdb/ambiguous.txt").read_text().split()
    assert 0 < len(ambiguous) < 15 and set(ambiguous) <= labelled  # about 20 % of the 30, all labelled images
    doc = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert doc["samples"] == 6 * 3 * 24 and {s["fold"] for s in doc["shards"]} == {1, 2, 3}
    idx = pq.read_table(tmp_path / "b" / "index.parquet").to_pylist()
    au6 = np.array([r["AU06"] == 1 for r in idx])
    au12 = np.array([r["AU12"] == 1 for r in idx])
    au15 = np.array([r["AU15"] == 1 for r in idx])
    assert au12.sum() > 0 and au15.sum() > 0
    # EMFACS structure: AU6 co-occurs with AU12 often, AU15 (lip corner depressor) almost never.
    assert (au6 & au12).sum() / au12.sum() > 0.4 and (au12 & au15).sum() / au12.sum() < 0.1
    assert {r["subject"] for r in idx} <= set(BP4D_SUBJECTS) | {s for p in STANDARD_FOLDS["bp4d"] for s in p}
