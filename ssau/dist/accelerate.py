"""accelerate launch's options, read from the environment it gives the processes, applied to ``train`` or refused.

`accelerate launch` hands its choices to the processes as environment variables (accelerate/utils/launch.py,
``prepare_simple_launcher_cmd_env``, ``prepare_multi_gpu_env``, ``prepare_deepspeed_cmd_env``); ssau builds no
``Accelerator``, so none of them would take effect unless read here. Each is honoured or refused with one line,
never dropped. Launcher-side options (process and machine counts, ports, gpu_ids, threads per process) act before
the processes start and need nothing here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from ssau.config import TrainConfig
from ssau.errors import ConfigError, InputError
from ssau.io import atomic_write
from ssau.readfile import read_json

_PRECISIONS = {"no": None, "bf16": "bf16"}  # "no" is also accelerate's default: it leaves train.precision alone
_REFUSED = {  # variable -> what it asked for; each stops the run with one line naming what ssau supports
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
    "ACCELERATE_USE_PARALLELISM_CONFIG": "a parallelism config (tensor/context/sequence parallel)",
    "ACCELERATE_USE_SAGEMAKER": "SageMaker",
}
_SUPPORTED = ("ssau runs plain data parallel (the default) or DeepSpeed ZeRO 0-2 (accelerate's --use_deepspeed "
              "--zero_stage N, or train.deepspeed=launch/deepspeed/zero2.json)")


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "y", "on")


def accelerate_settings(train: TrainConfig, env: Mapping[str, str] | None = None) -> TrainConfig:
    """``train`` with accelerate's launch options applied (``env``: ``os.environ`` unless given), or ConfigError.

    Honoured: ``--mixed_precision bf16`` (train.precision=bf16 when it is auto), ``--cpu`` (train.device=cpu when
    auto), ``--use_deepspeed`` with ``--zero_stage 0|1|2`` (a DeepSpeed JSON for that stage, written once under
    ssau's cache directory, becomes train.deepspeed) or with ``--deepspeed_config_file`` (that file becomes
    train.deepspeed). Refused, with one line: fp16/fp8, ZeRO-3, offload, MoE layers, FSDP, Megatron-LM,
    parallelism configs, dynamo backends, and any choice that contradicts a train.* key the user set."""
    env = os.environ if env is None else env
    changes: dict = {}
    for name, what in _REFUSED.items():
        if _flag(env, name):
            raise ConfigError(f"accelerate launch asks for {what}: {_SUPPORTED}")
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "NO").strip().upper()
    if dynamo not in ("", "NO"):
        raise ConfigError(f"accelerate launch --dynamo_backend {dynamo.lower()}: ssau does not compile its models "
                          "(torch.compile); launch without --dynamo_backend (or dynamo_backend: 'no' in the config)")

    mixed = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if mixed not in _PRECISIONS:
        raise ConfigError(f"accelerate launch --mixed_precision {mixed}: ssau has no {mixed} path; use "
                          "--mixed_precision bf16 (or train.precision=bf16) or --mixed_precision no")
    wanted = _PRECISIONS[mixed]
    if wanted and train.precision == "auto":
        changes["precision"] = wanted
    elif wanted and train.precision != wanted:
        raise ConfigError(f"accelerate launch --mixed_precision {mixed} contradicts train.precision="
                          f"{train.precision}: drop one of them")

    if _flag(env, "ACCELERATE_USE_CPU"):
        if train.device == "cuda":
            raise ConfigError("accelerate launch --cpu contradicts train.device=cuda: drop one of them")
        changes["device"] = "cpu"

    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        changes["deepspeed"] = _deepspeed_from_accelerate(train.deepspeed, env)
    return replace(train, **changes) if changes else train


def _deepspeed_from_accelerate(current: str, env: Mapping[str, str]) -> str:
    """The DeepSpeed config file that accelerate's DeepSpeed options name, checked against train.deepspeed."""
    for name, what in (("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "offload_optimizer_device"),
                       ("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "offload_param_device")):
        device = env.get(name, "none").strip().lower()
        if device != "none":  # ZeRO-Offload wants DeepSpeed's own CPU optimiser; ssau builds torch optimisers
            raise ConfigError(f"accelerate launch --{what} {device}: ssau does not offload to {device}; "
                              f"use --{what} none")
    for name, what in (("ACCELERATE_DEEPSPEED_ZERO3_INIT", "zero3_init_flag"),
                       ("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "zero3_save_16bit_model")):
        if _flag(env, name):
            raise ConfigError(f"accelerate launch --{what} true: ZeRO-3 options; ssau supports ZeRO stages 0-2")
    if env.get("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES"):
        raise ConfigError("accelerate launch --deepspeed_moe_layer_cls_names: ssau's models have no MoE layers")
    for name, key, allowed in (("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "optim.accumulate", "1"),
                               ("ACCELERATE_GRADIENT_CLIPPING", "optim.clip_grad", None)):
        value = env.get(name)
        if value is not None and value.strip() != allowed:  # ssau sets both in the engine from its own keys
            flag = name.removeprefix("ACCELERATE_").lower()
            raise ConfigError(f"accelerate launch --{flag} {value}: ssau reads {key}; set {key}={value} and drop "
                              f"--{flag}")

    stage_text = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
    if stage_text and stage_text not in ("0", "1", "2"):
        raise ConfigError(f"accelerate launch --zero_stage {stage_text}: ssau supports ZeRO stages 0-2 "
                          "(stage 3 partitions parameters, which its methods read whole)")
    named = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "").strip()
    if named:
        path = Path(named).resolve()
        if not path.is_file():
            raise ConfigError(f"accelerate launch --deepspeed_config_file {named}: no such file")
        if current and Path(current).resolve() != path:
            raise ConfigError(f"accelerate launch --deepspeed_config_file {named} contradicts train.deepspeed="
                              f"{current}: drop one of them")
        current = str(path)
    if current:
        if stage_text and _file_stage(current) != int(stage_text):
            raise ConfigError(f"accelerate launch --zero_stage {stage_text} contradicts {current} (ZeRO stage "
                              f"{_file_stage(current)}): drop one of them")
        return current
    return _write_zero_config(int(stage_text or "2"), env)  # accelerate's own default stage is 2 (DeepSpeedPlugin)


def _file_stage(path: str) -> object:
    try:
        return read_json(path, "DeepSpeed config").get("zero_optimization", {}).get("stage", 0)
    except (OSError, ValueError, AttributeError, InputError) as e:
        raise ConfigError(f"train.deepspeed: {path} is not a DeepSpeed JSON config ({e})") from None


def _write_zero_config(stage: int, env: Mapping[str, str]) -> str:
    """launch/deepspeed/zero<N>.json's settings for this stage, in a file named by its content under ssau's cache
    directory (XDG_CACHE_HOME or ~/.cache): every rank computes and writes the same bytes (under a temporary name,
    then renamed), and the path kept in the run's config still exists when its checkpoint is evaluated later."""
    zero: dict = {"stage": stage}
    if stage >= 1:
        zero["reduce_bucket_size"] = 50_000_000
    if stage == 2:
        zero |= {"overlap_comm": False, "contiguous_gradients": True, "allgather_bucket_size": 50_000_000}
    # No bf16 section: ssau's train.precision=bf16 is autocast over fp32 parameters, which the engines keep.
    text = json.dumps({"zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False},
                      indent=2) + "\n"
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssau" / "deepspeed"
    path = cache / f"accelerate-zero{stage}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    if not path.is_file() or path.read_text() != text:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            atomic_write(path, text.encode())
        except OSError as e:
            raise ConfigError(f"accelerate launch --use_deepspeed: cannot write {path} ({e}); pass "
                              f"train.deepspeed=launch/deepspeed/zero{max(stage, 1)}.json instead") from None
    return str(path)
