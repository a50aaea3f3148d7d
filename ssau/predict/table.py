"""The rows ``ssau predict`` writes and the MLflow model answers with: OpenFace 2.0's and py-feat's column names
(``x_0..x_67``, ``y_0..y_67``, ``AU01``.. probabilities, ``AU01_c``.. presence at the model's thresholds)."""

from __future__ import annotations

import math
from pathlib import Path

from ssau.aus import au_name
from ssau.io import atomic_file

LANDMARK_COLUMNS = [f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)]


def au_columns(aus: tuple[int, ...], probs: list[float] | None, thresholds: list[float]) -> dict:
    """``AU01``.. and ``AU01_c``.. of one face (None where there is no face)."""
    names = [au_name(a) for a in aus]
    if probs is None:
        return {n: None for n in names} | {f"{n}_c": None for n in names}
    return ({n: float(p) for n, p in zip(names, probs)}
            | {f"{n}_c": int(p >= t) for n, p, t in zip(names, probs, thresholds)})


def table_row(r: dict, aus: tuple[int, ...], probs: list[float] | None, thresholds: list[float]) -> dict:
    pts = r["points"]
    x, y, w, h = r["box"]
    out = {"input": r["input"], "frame": int(r["frame"]), "timestamp": float(r["timestamp"]),
           "face_id": int(r["face_id"]), "confidence": float(r["confidence"]), "success": int(r["success"]),
           "face_x": x, "face_y": y, "face_width": w, "face_height": h}
    out |= {c: (float(pts[i % 68][i // 68]) if pts is not None else math.nan) for i, c in enumerate(LANDMARK_COLUMNS)}
    return out | au_columns(aus, probs, thresholds) | {"problem": r["problem"]}


def write_table(rows: list[dict], out: Path) -> None:
    import pyarrow as pa  # lazy: only the writer needs it
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as f:
        if out.suffix.lower() == ".parquet":
            pq.write_table(table, f)
        else:
            pacsv.write_csv(table, f)
