"""RTATL's cost: parameters and GFLOPs of training and inference (beside the paper's 54.62M / 10.75 and
19.12M / 5.57 at 192 px), and seconds per step of each Table 1 variant relative to the bare backbone:
`python -m ssau.bench.rtatl_cost --labelled demo/shards/bp4d-flow --unlabelled demo/shards/pool`.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one image's forward (a multiply-add counts 2;
GMACs are half) at ``--size`` px (the paper's 192) with BP4D's 12 AUs: inference is ``predict`` (the recognition
path, template regions); training adds what one image costs the two updates' forwards (the cropped forward, the
intact pseudo-label pass, G on its two tokens, D and C on two real and two generated patches, the flow head).
Step times go through ``Trainer.train_step`` with the stream (``ssau.bench.ssl_steps.step_seconds``) on the recipe
``launch/recipes/rtatl.yaml``. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from ssau.aus import STANDARD_AUS
from ssau.bench.ssl_steps import compare_steps
from ssau.config import ModelConfig
from ssau.methods.registry import build_method, resolve_params
from ssau.methods.rtatl.regions import region_side

VARIANTS = {"backbone": ["transformer=false", "inpaint=false", "flow=false"],
            "transformer": ["inpaint=false", "flow=false"], "ofe": ["inpaint=false"], "roii": ["flow=false"],
            "rtatl": []}


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_cost(size: int, backbone: str) -> dict:
    aus = STANDARD_AUS["bp4d"]
    m = build_method(resolve_params({"name": "rtatl"}), aus, ModelConfig(backbone=backbone)).eval()
    img = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        infer = flops(lambda: m.predict(img))
        regions = m.regions(None, 1, size, img.device)
        side = int(round(region_side(size)))

        def train_forward():
            m.recognise(img, regions)  # the cropped forward (the same shapes as the intact one)
            m.recognise(img, regions)  # the intact pass for C's targets
            _, tokens, last = m.recognise(img, regions)
            fake = m.generator(tokens[:, :2].reshape(2, -1), side)
            real = torch.zeros_like(fake)
            for net in (m.discriminator, m.classifier):
                net(fake), net(real)
            m.flow_head(last, size)
        train = flops(train_forward) - flops(lambda: m.recognise(img, regions))  # two forwards, as a step has
    n_train = sum(p.numel() for p in m.parameters())
    n_infer = sum(v.numel() for v in m.inference_state().values() if v.is_floating_point())
    return {"size": size, "backbone": backbone, "params_train_M": round(n_train / 1e6, 2),
            "params_infer_M": round(n_infer / 1e6, 2), "gflops_train": round(train / 1e9, 2),
            "gflops_infer": round(infer / 1e9, 2), "gmacs_train": round(train / 2e9, 2),
            "gmacs_infer": round(infer / 2e9, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="launch/recipes/rtatl.yaml")
    ap.add_argument("--labelled", required=True)
    ap.add_argument("--unlabelled", required=True)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--sizes", default="192,64")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    for size in map(int, a.sizes.split(",")):
        print(json.dumps(model_cost(size, a.backbone)), flush=True)
    overrides = [f"data.labelled=[{a.labelled}]", f"data.unlabelled=[{a.unlabelled}]", f"model.backbone={a.backbone}"]
    arms = {name: ("rtatl", overrides + [f"method.{k}" for k in keys]) for name, keys in VARIANTS.items()}
    print(json.dumps({"backbone": a.backbone, "steps": a.steps,
                      "results": compare_steps(a.config, arms, a.warmup, a.steps)}))


if __name__ == "__main__":
    main()
