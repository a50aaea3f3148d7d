"""Real ranks: `accelerate launch` with the shipped configs, 2 gloo ranks on CPU; DeepSpeed ZeRO-2; 2 nodes x 1.

Each rank writes ranks/rank<r>.json from inside the process (world size and backend read from torch.distributed,
the keys of its first batch, a digest of its full model state); the tests assert on those.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(corpora) -> Path:
    return corpora.bp4d(shard_size=3)


@pytest.fixture(scope="module")
def flow_shards(corpora) -> Path:
    return corpora.bp4d_flow()


@pytest.fixture(scope="module")
def expression(corpora) -> Path:
    return corpora.rafdb(shard_size=4)


def _method_args(method: str, expression: Path) -> list[str]:
    if method == "mal":  # the expression stream and the AU validation set; no unlabelled images
        return [f"data.expression=[{expression}]", "data.m_expr=4", "data.validation=0.1", "data.val_batch=4",
                "data.m2=0"]
    if method == "mlcr":  # 3 steps crossing the stage switch: 2 of co-regularisation, then the GCN stage (its H1
        # fitted at the switch on every rank: the state digests must still agree)
        return ["data.label_drop=0.5", "data.m2=4", "method.stage1_steps=2", "method.stage2_steps=1",
                "method.gcn_init=fit"]
    if method == "large_margin":  # the balance measured over steps 2-3 (step 1 has no centroid yet)
        return ["data.label_drop=0.5", "data.m2=4", "method.balance=auto", "method.balance_steps=2"]
    if method == "pseudo_label":  # a threshold the 3-step tiny net's predictions reach
        return ["data.label_drop=0.5", "data.m2=4", "method.p_cutoff=0.51"]
    if method == "rtatl":  # every part on: flow (its own shards), inpainting, the transformer (small sizes)
        return ["data.label_drop=0.5", "data.m2=4", "data.flow=true", "method.d=16", "method.heads=2",
                "method.fused_width=8"]
    if method == "fixmatch":  # CAP's thresholds: the queue of every rank's rows must be the same on both ranks
        return ["data.label_drop=0.5", "data.m2=4", "method.threshold=class_aware", "method.cap_queue=6"]
    return ["data.label_drop=0.5", "data.m2=4"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["-m", "ssau", "train", f"data.labelled=[{shards}]", "model.backbone=tiny", "data.image_size=32",
            "data.m1=4", "data.workers=0", "data.eval_batch=8", "train.steps=3", f"train.out={out}",
            f"train.name={name}", "train.rank_report=true", "train.progress=false", "train.log_every=1", *extra]


def _env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _launch(config: str, args: list[str], *flags: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "accelerate" / config),
           "--main_process_port", str(flags[0]) if flags else str(_port()), *flags[1:], *args]
    return subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: int = 420) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-4000:]


def _reports(run: Path) -> list[dict]:
    return [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def _assert_data_parallel(reports: list[dict]) -> None:
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["backend"] == "gloo" and r["step"] == 3 for r in reports)
    assert not set(reports[0]["first_keys"]) & set(reports[1]["first_keys"])  # different data on each rank
    assert reports[0]["state_sha256"] == reports[1]["state_sha256"]  # equal parameters (and buffers) after


@pytest.mark.parametrize("method", ["supervised", "adversarial", "mal", "mlcr", "large_margin", "pseudo_label",
                                    "mean_teacher", "fixmatch", "rtatl"])
def test_two_cpu_ranks_with_accelerate_launch_and_deepspeed_zero2(shards, expression, flow_shards, tmp_path, method):
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extra = _method_args(method, expression)
    shards = flow_shards if method == "rtatl" else shards
    _finish([_launch("cpu-2ranks.yaml", _train_args(shards, tmp_path, "ddp", f"tracking.uri={db}",
                                                    f"method.name={method}", *extra))])
    ddp = _reports(tmp_path / "ddp")
    _assert_data_parallel(ddp)
    assert not any(r["deepspeed"] for r in ddp)

    _finish([_launch("cpu-2ranks.yaml", _train_args(shards, tmp_path, "zero2", "tracking.enabled=false",
                                                     f"method.name={method}", *extra,
                                                     f"train.deepspeed={ROOT / 'launch/deepspeed/zero2.json'}"))])
    zero2 = _reports(tmp_path / "zero2")
    _assert_data_parallel(zero2)
    assert all(r["deepspeed"] for r in zero2)
    # Same seeds, same data: ZeRO-2's reduce-scatter and partitioned Adam reach the state plain averaging reaches.
    a = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["method"]
    b = torch.load(tmp_path / "zero2" / "model.pt", weights_only=True)["method"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    if method == "mal":  # the second-order step under ZeRO-1 as well
        _finish([_launch("cpu-2ranks.yaml", _train_args(shards, tmp_path, "zero1", "tracking.enabled=false",
                                                         f"method.name={method}", *extra,
                                                         f"train.deepspeed={ROOT / 'launch/deepspeed/zero1.json'}"))])
        _assert_data_parallel(_reports(tmp_path / "zero1"))
        c = torch.load(tmp_path / "zero1" / "model.pt", weights_only=True)["method"]
        for k in a:
            assert torch.allclose(a[k].float(), c[k].float(), atol=1e-6), k
    # ... and training moved them: they differ from the seeded initialisation every rank starts from.
    from ssau.dist.rng import seed_all
    from ssau.methods.registry import build_method
    from ssau.train.setup import load_run_config

    seed_all(0)
    cfg = load_run_config(None, ["data.labelled=[x]", "model.backbone=tiny", f"method.name={method}", "train.steps=3",
                             *extra])
    aus = tuple(torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["aus"])
    init = build_method(cfg.method, aus, cfg.model).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a if a[k].is_floating_point())
    if method == "mal":  # psi left its zero initialisation, identically on both ranks (the digests above)
        assert a["meta.weight"].abs().max() > 0
    if method == "mlcr":  # the switch was crossed: W^0 taken (the stage-1 classifiers), the GCN trained after it
        assert a["switched"] == 1 and torch.equal(a["w0"][0, :, :-1], a["twins.0.head.weight"])
        assert not torch.equal(init["gcn.h0"], a["gcn.h0"]) and not torch.equal(init["gcn.h1"], a["gcn.h1"])
    if method == "mean_teacher":  # the EMA teacher moved with the student (identical on both ranks: the digests)
        assert not torch.equal(a["teacher.head__weight"], init["teacher.head__weight"])
        assert not torch.equal(a["teacher.head__weight"], a["head.weight"])
    if method == "large_margin":  # centroids from every step's global batch (4 + 4 images on 2 ranks), balanced
        assert a["counts"].sum() == 3 * 16 and a["centroids"].abs().sum() > 0 and a["lambda_auto"] > 0
    if method == "rtatl":  # model.pt holds the recognition path: the auxiliary heads stayed behind
        assert "relation.indicators" in a and not [k for k in a if k.startswith(("generator.", "discriminator."))]

    # Rank 0 alone logged, after reducing across ranks: one run, world_size 2.
    client = MlflowClient(tracking_uri=db)
    (run,) = client.search_runs([client.get_experiment_by_name("ssau").experiment_id])
    assert run.data.tags["world_size"] == "2"
    first_update = {"supervised": "supervised", "adversarial": "discriminator", "mal": "meta", "mlcr": "mlcr",
                    "large_margin": "large_margin", "rtatl": "model"}.get(method, "supervised")
    assert [m.step for m in client.get_metric_history(run.info.run_id, f"train/{first_update}/loss")] == [1, 2, 3]


def test_multi_node_config_as_two_nodes_of_one_process(shards, tmp_path):
    port = _port()
    args = _train_args(shards, tmp_path, "nodes", "tracking.enabled=false")
    procs = [_launch("multi-node-cpu-test.yaml", args, port, "--machine_rank", str(r)) for r in (0, 1)]
    _finish(procs)
    _assert_data_parallel(_reports(tmp_path / "nodes"))
