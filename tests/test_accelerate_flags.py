"""accelerate launch's options (environment variables in the ranks) are honoured or refused with one line.

Unit tests call ``accelerate_settings`` with crafted environments (the variables `accelerate launch` sets, as
accelerate/utils/launch.py writes them); one real launch trains 2 CPU ranks under
``accelerate launch --use_deepspeed --zero_stage 2`` with no train.deepspeed and finds ZeRO-2 engine state in the
run's checkpoints, and one real launch with ``--mixed_precision fp16`` stops every rank with one line.
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
import yaml
from corpora import shard_bp4d

from ssau.config import TrainConfig
from ssau.dist.accelerate import accelerate_settings
from ssau.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = str(ROOT / "launch" / "deepspeed" / "zero2.json")
# What `accelerate launch` with no options writes into every rank (simple and multi-GPU launchers).
DEFAULTS = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "False",
            "ACCELERATE_DYNAMO_MODE": "default", "ACCELERATE_DYNAMO_USE_FULLGRAPH": "False"}


def _env(tmp_path: Path, **extra: str) -> dict:
    return DEFAULTS | {"XDG_CACHE_HOME": str(tmp_path / "cache")} | extra


def _refused(train: TrainConfig, env: dict, *words: str) -> str:
    with pytest.raises(ConfigError) as e:
        accelerate_settings(train, env)
    line = str(e.value)
    assert "\n" not in line and all(w in line for w in words), line
    return line


def test_no_accelerate_options_leave_the_config_as_it_is(tmp_path):
    t = TrainConfig(precision="fp32", deepspeed=ZERO2)
    assert accelerate_settings(t, {}) == t
    assert accelerate_settings(t, _env(tmp_path)) == t  # accelerate's defaults ("no", "NO", "False") are no choice


def test_mixed_precision_bf16_sets_auto_precision_and_fp16_is_refused(tmp_path):
    assert accelerate_settings(TrainConfig(), _env(tmp_path, ACCELERATE_MIXED_PRECISION="bf16")).precision == "bf16"
    assert accelerate_settings(TrainConfig(precision="bf16"),
                               _env(tmp_path, ACCELERATE_MIXED_PRECISION="bf16")).precision == "bf16"
    _refused(TrainConfig(precision="fp32"), _env(tmp_path, ACCELERATE_MIXED_PRECISION="bf16"),
             "--mixed_precision bf16", "train.precision=fp32")
    for mode in ("fp16", "fp8"):
        _refused(TrainConfig(), _env(tmp_path, ACCELERATE_MIXED_PRECISION=mode), f"no {mode} path",
                 "train.precision=bf16")


def test_cpu_flag_sets_the_device(tmp_path):
    assert accelerate_settings(TrainConfig(), _env(tmp_path, ACCELERATE_USE_CPU="True")).device == "cpu"
    _refused(TrainConfig(device="cuda"), _env(tmp_path, ACCELERATE_USE_CPU="True"), "--cpu", "train.device=cuda")


def test_use_deepspeed_with_a_zero_stage_writes_that_stage_config(tmp_path):
    for stage in (0, 1, 2):
        env = _env(tmp_path, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage))
        path = accelerate_settings(TrainConfig(), env).deepspeed
        assert Path(path).parent == tmp_path / "cache" / "ssau" / "deepspeed"
        ds = json.loads(Path(path).read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert not {"train_batch_size", "optimizer", "scheduler"} & set(ds)  # deepspeed_engine sets or refuses them
        assert accelerate_settings(TrainConfig(), env).deepspeed == path  # the same file on every rank and call
    # No --zero_stage: accelerate's DeepSpeedPlugin defaults to stage 2, and so does ssau.
    path = accelerate_settings(TrainConfig(), _env(tmp_path, ACCELERATE_USE_DEEPSPEED="true")).deepspeed
    assert json.loads(Path(path).read_text())["zero_optimization"]["stage"] == 2
    # Resolving twice (the trainer after `ssau cv`'s init_runtime) changes nothing.
    once = accelerate_settings(TrainConfig(), _env(tmp_path, ACCELERATE_USE_DEEPSPEED="true"))
    assert accelerate_settings(once, _env(tmp_path, ACCELERATE_USE_DEEPSPEED="true")) == once


def test_use_deepspeed_agrees_with_or_refuses_train_deepspeed(tmp_path):
    ds = _env(tmp_path, ACCELERATE_USE_DEEPSPEED="true")
    assert accelerate_settings(TrainConfig(deepspeed=ZERO2), ds).deepspeed == ZERO2
    assert accelerate_settings(TrainConfig(deepspeed=ZERO2), ds | {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
                               ).deepspeed == ZERO2
    _refused(TrainConfig(deepspeed=ZERO2), ds | {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "--zero_stage 1",
             "zero2.json", "stage 2")
    for stage in ("3", "x"):
        _refused(TrainConfig(), ds | {"ACCELERATE_DEEPSPEED_ZERO_STAGE": stage}, f"--zero_stage {stage}",
                 "stages 0-2")


def test_a_deepspeed_config_file_named_through_accelerate(tmp_path):
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    ds = _env(tmp_path, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(mine))
    assert accelerate_settings(TrainConfig(), ds).deepspeed == str(mine.resolve())
    assert accelerate_settings(TrainConfig(deepspeed=str(mine)), ds).deepspeed == str(mine.resolve())
    _refused(TrainConfig(deepspeed=ZERO2), ds, "--deepspeed_config_file", "train.deepspeed=")
    _refused(TrainConfig(), ds | {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "--zero_stage 2", "stage 1")
    _refused(TrainConfig(), ds | {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "gone.json")}, "no such file")
    (tmp_path / "bad.json").write_text("{not json")
    _refused(TrainConfig(), ds | {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "bad.json"),
                                  "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "not a DeepSpeed JSON")


@pytest.mark.parametrize("name, value, words", [
    ("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu", ("--offload_optimizer_device cpu", "none")),
    ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "nvme", ("--offload_param_device nvme",)),
    ("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true", ("zero3_init_flag", "stages 0-2")),
    ("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true", ("zero3_save_16bit_model",)),
    ("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", "Block", ("MoE",)),
    ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", ("optim.accumulate=4",)),
    ("ACCELERATE_GRADIENT_CLIPPING", "1.0", ("optim.clip_grad=1.0",)),
])
def test_deepspeed_options_ssau_does_not_take_are_refused(tmp_path, name, value, words):
    _refused(TrainConfig(), _env(tmp_path, ACCELERATE_USE_DEEPSPEED="true", **{name: value}), *words)


def test_the_shipped_accelerate_deepspeed_config_is_accepted(tmp_path):
    # launch/accelerate/deepspeed-zero2.yaml's deepspeed_config, as accelerate writes it into every rank
    # (prepare_deepspeed_cmd_env: names from accelerate/utils/launch.py, values lower-cased strings).
    section = yaml.safe_load((ROOT / "launch/accelerate/deepspeed-zero2.yaml").read_text())["deepspeed_config"]
    names = {"zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
             "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
             "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
             "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
             "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT"}
    env = _env(tmp_path, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_CONFIG_DS_FIELDS=",".join(section),
               **{names[k]: str(v).lower() for k, v in section.items()})
    path = accelerate_settings(TrainConfig(), env).deepspeed
    assert json.loads(Path(path).read_text())["zero_optimization"]["stage"] == section["zero_stage"] == 2


@pytest.mark.parametrize("name, value, words", [
    ("ACCELERATE_USE_FSDP", "true", ("FSDP", "--use_deepspeed", "train.deepspeed=launch/deepspeed/zero2.json")),
    ("ACCELERATE_USE_MEGATRON_LM", "true", ("Megatron-LM", "ZeRO 0-2")),
    ("ACCELERATE_USE_PARALLELISM_CONFIG", "true", ("parallelism config",)),
    ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", ("--dynamo_backend inductor", "torch.compile")),
])
def test_other_distributed_modes_and_dynamo_are_refused(tmp_path, name, value, words):
    _refused(TrainConfig(), _env(tmp_path, **{name: value}), *words)


# ------------------------------------------------------------------------------------------------ real launches
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, shards: Path, flags: list[str], *extra: str, timeout: int = 240):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port",
           str(_port()), *flags, "-m", "ssau", "train", f"data.labelled=[{shards}]", "model.backbone=tiny",
           "data.image_size=32", "data.m1=4", "data.m2=0", "data.workers=0", "data.eval_batch=8", "train.steps=2",
           f"train.out={tmp_path / 'runs'}", "train.name=run", "train.rank_report=true", "train.progress=false",
           "tracking.enabled=false", *extra]
    # ssau's cache in tmp_path; torch's extension builds (DeepSpeed's shm op, compiled on first use) where they were.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "XDG_CACHE_HOME": str(tmp_path / "c"),
                        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions"))}
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_accelerate_launch_use_deepspeed_zero2_trains_two_cpu_ranks_with_zero2(tmp_path):
    shards = shard_bp4d(tmp_path / "data", shard_size=3)
    done = _launch(tmp_path, shards, ["--use_deepspeed", "--zero_stage", "2"])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    run = tmp_path / "runs" / "run"
    reports = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"], r["backend"], r["deepspeed"]) for r in reports] == [
        (0, 2, "gloo", True), (1, 2, "gloo", True)]
    assert reports[0]["state_sha256"] == reports[1]["state_sha256"]
    # ZeRO-2 partitions the optimiser state: each rank saved its own part under the run's checkpoints.
    parts = sorted(p.name for p in (run / "checkpoints" / "deepspeed").rglob("*optim_states.pt"))
    assert parts == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"], parts
    # The model's saved config names the stage-2 file ssau built from accelerate's options.
    deepspeed = torch.load(run / "model.pt", weights_only=True)["config"]["train"]["deepspeed"]
    assert Path(deepspeed).parent == tmp_path / "c" / "ssau" / "deepspeed" and "zero2" in Path(deepspeed).name


def test_accelerate_launch_mixed_precision_fp16_stops_the_ranks_with_one_line(tmp_path):
    shards = shard_bp4d(tmp_path / "data", shard_size=3)
    done = _launch(tmp_path, shards, ["--config_file", str(ROOT / "launch/accelerate/cpu-2ranks.yaml"),
                                      "--mixed_precision", "fp16"], timeout=90)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-4000:]
    # Every rank raises the same line; torchrun stops the peers of the first rank that exits, so the second
    # line is printed only when that rank got there first.
    errors = [line for line in out.splitlines() if line.startswith("ssau: error:")]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, out[-4000:]
    assert "--mixed_precision fp16" in errors[0] and "train.precision=bf16" in errors[0]
    assert "exitcode  : 2" in out  # the root cause torchrun reports: ssau's exit status for a user error
    assert "Traceback" not in out.split("ssau: error:")[0]  # the line comes before any traceback (launcher's own)
    assert not (tmp_path / "runs" / "run" / "ranks").exists()  # stopped before anything trained
