"""BatchNorm over the global batch (``model.sync_bn``): the statistics one process holding every rank's samples
would compute, and their gradients.

On GPUs torch's ``nn.SyncBatchNorm`` does this with fused kernels. It refuses CPU tensors, so on CPU (gloo ranks,
the tests) ``GlobalBatchNorm`` computes the same thing with two differentiable all-reduces: the global mean, then
the global sum of squared deviations (two passes, not sum and sum of squares, so that large activations do not
cancel). Running statistics are then identical on every rank: the unbiased global variance, as BatchNorm keeps.
In evaluation mode, or in a single process, it is plain BatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from ssau.dist.collectives import sum_across_ranks, world_size


class GlobalBatchNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        xf = x.float()
        count = sum_across_ranks(torch.tensor([x.numel() / x.shape[1]], dtype=xf.dtype, device=x.device))
        mean = sum_across_ranks(xf.sum(dims), differentiable=True) / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = sum_across_ranks((centred * centred).sum(dims), differentiable=True) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * count / (count - 1).clamp_min(1))
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``module`` replaced by a global-batch one (state kept); returns the module."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats, device=device)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_sync_bn(child, device)
    return module
