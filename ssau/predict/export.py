"""``ssau export MODEL --onnx FILE``: the recognition path as one ONNX file.

- What is exported: ``Method.predict`` of the model's inference path, from the network's uint8 input
  [N, 3, S, S] (S: the card's ``image_size``; the face already aligned and cropped as ``ssau predict`` makes it) to
  float32 AU probabilities [N, J]. The batch axis is dynamic (``batch``); the pixel normalisation is inside.
- Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). It writes large weights to a
  ``.onnx.data`` sidecar by default; ``external_data=False`` keeps everything in the one file (ONNX's protobuf limit
  is 2 GB, far above these networks). Opset 18 by default.
- Check (default on): onnxruntime's CPU provider runs the file on a random batch of two sizes and its outputs are
  compared with PyTorch's; the largest difference is printed, and a difference above ``TOLERANCE`` fails the export
  (the file is then not left under its name).
- The model card (thresholds, preprocessing, AU names, the landmark licence where it applies) is written into the
  file's ``metadata_props`` as JSON, so a consumer of the .onnx file knows how to prepare its input.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssau.aus import au_name
from ssau.errors import UserError
from ssau.predict.model import load_recogniser

TOLERANCE = 1e-4


class Recognition(nn.Module):
    """uint8 [N, 3, S, S] -> float32 AU probabilities [N, J]."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.method.predict(images).float()


def _check(path: Path, module: nn.Module, size: int) -> float:
    import onnxruntime as ort  # lazy: only the check needs it

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    g = torch.Generator().manual_seed(0)
    for n in (1, 5):
        x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            want = module(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def export_onnx(model: str, out: Path, opset: int = 18, check: bool = True) -> str:
    """Write ``out``; returns a one-line summary."""
    if out.suffix.lower() != ".onnx":
        raise UserError(f"--onnx {out}: a .onnx file")
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript, the check onnxruntime: the [export] extra)
        import onnxscript  # noqa: F401
        if check:
            import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("ssau export needs onnx and onnxscript (and onnxruntime for the check): "
                        "pip install -e '.[export]'") from None
    rec = load_recogniser(model, device="cpu")
    module = Recognition(rec.method).eval()
    size = rec.card["preprocess"]["image_size"]
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, input_names=["images"],
                                        output_names=["probabilities"], verbose=False,
                                        dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
            program.model.metadata_props.update({"ssau.card": json.dumps(rec.card), "ssau.aus": json.dumps(
                [au_name(a) for a in rec.aus]), "ssau.input": f"uint8 [batch, 3, {size}, {size}] RGB, aligned face"})
            program.save(str(tmp), external_data=False)
            worst = _check(tmp, module, size) if check else None
        except Exception as e:  # noqa: BLE001 - the exporter's and onnxruntime's errors are many; one line each
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"--onnx {out}: the {rec.cfg.method_name} model could not be exported at opset {opset} "
                            f"({type(e).__name__}: {first})") from None
        if worst is not None and not worst <= TOLERANCE:
            raise UserError(f"--onnx {out}: onnxruntime differs from PyTorch by {worst:.2e} (> {TOLERANCE}); "
                            f"not written")
        os.chmod(tmp, 0o644)  # mkstemp made it private; an exported model is meant to be shared
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    checked = f"; onnxruntime vs PyTorch: max |diff| {worst:.1e}" if worst is not None else ""
    return (f"{out}: {rec.cfg.method_name} on {size} px faces, {len(rec.aus)} AUs, batch dynamic, "
            f"{out.stat().st_size / 1e6:.1f} MB{checked}")
