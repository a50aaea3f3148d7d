"""DeepSpeed engines: with ``train.deepspeed=FILE`` each optimiser group becomes an engine (ZeRO stage 0-2) that
owns its optimiser, its gradient reduction and partitioning, and its clipping. DeepSpeed is imported only here and
only when an engine is built (an optional heavy dependency on the CPU path)."""

from __future__ import annotations

import os

from torch import nn

from ssau.checkpoints import safe_load
from ssau.errors import ConfigError
from ssau.readfile import read_json


class _Params(nn.Module):
    """The parameters of one optimiser group as a module, for deepspeed.initialize (forward is never called:
    methods compute losses with their own modules; ZeRO-1/2 reduce through hooks on these same parameters)."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


def deepspeed_engine(params: list[nn.Parameter], optimizer, scheduler, path: str, micro_batch: int,
                     accumulate: int, clip: float):
    import deepspeed

    ds = read_json(path, "DeepSpeed config")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage > 2:
        raise ConfigError(f"train.deepspeed: ZeRO stage {stage} partitions parameters; ssau supports stages 0-2")
    for key in ("train_batch_size", "optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"train.deepspeed: remove {key!r} from {path}; ssau sets it from the run config")
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accumulate,
              gradient_clipping=clip, zero_allow_untested_optimizer=True)
    ds.setdefault("steps_per_print", 10**9)
    os.environ.setdefault("LOCAL_RANK", os.environ.get("LOCAL_RANK", "0"))
    engine, _, _, _ = deepspeed.initialize(model=_Params(params), optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds, dist_init_required=False)
    engine.checkpoint_engine.load = _deepspeed_safe_load  # DeepSpeed's own loader unpickles anything
    return engine


def _deepspeed_safe_load(path: str, map_location=None):
    """DeepSpeed checkpoint files through ``safe_load``: weights only, plus the three DeepSpeed classes its ZeRO
    optimiser state holds (checked with ``torch.serialization.get_unsafe_globals_in_checkpoint``)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return safe_load(path, map_location, allow=(ZeroStageEnum, LossScaler, fragment_address))

