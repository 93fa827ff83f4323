"""A reference BatchNorm whose backward is the textbook's derivation written out.

Forward, training, per channel over the m = N*H*W values of a mini-batch:

    mu = 1/m sum x_i        var = 1/m sum (x_i - mu)^2        xhat_i = (x_i - mu) / sqrt(var + eps)
    y_i = gamma * xhat_i + beta

Backward, from the computation graph, nearest variables first:

    dgamma = sum dy_i * xhat_i                 dbeta = sum dy_i
    dxhat_i = dy_i * gamma
    dvar   = sum dxhat_i * (x_i - mu) * (-1/2) * (var + eps)^(-3/2)
    dmu    = dvar * (-2/m) * sum (x_i - mu) + sum dxhat_i * (-1 / sqrt(var + eps))
    dx_i   = dmu / m + dvar * 2 (x_i - mu) / m + dxhat_i / sqrt(var + eps)

Running statistics follow torch's convention: r = (1 - momentum) r + momentum * batch stat,
so torch's momentum 0.1 is the textbook's beta 0.9; the running variance stores the unbiased
m/(m-1) * var (the textbook: Var(x) = m/(m-1) E[var_B]). In eval mode y = gamma (x - r_mu)/sqrt(r_var + eps) + beta
and the backward is the same chain with mu, var held constant.

This is for checking and teaching, not speed: models use ``nn.BatchNorm2d``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _axes(x: Tensor) -> tuple[int, ...]:
    # Every axis but the channel axis 1: (N,) for (N, C), (N, H, W) for (N, C, H, W).
    return (0,) + tuple(range(2, x.dim()))


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    return t.view((1, -1) + (1,) * (x.dim() - 2))


class BatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, running_mean, running_var, training, momentum, eps):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected (N, C) or (N, C, H, W) input, got shape {tuple(x.shape)}")
        axes = _axes(x)
        m = x.numel() // x.shape[1]
        if training:
            if m < 2:
                raise ValueError("BatchNorm in training needs more than 1 value per channel, "
                                 f"got input {tuple(x.shape)}")
            mu = x.mean(dim=axes)
            var = ((x - _per_channel(mu, x)) ** 2).mean(dim=axes)
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(momentum * mu)
                running_var.mul_(1 - momentum).add_(momentum * var * m / (m - 1))
        else:
            mu, var = running_mean, running_var
        inv_std = torch.rsqrt(var + eps)
        xhat = (x - _per_channel(mu, x)) * _per_channel(inv_std, x)
        ctx.save_for_backward(x, gamma, mu, inv_std, xhat)
        ctx.training = training
        return _per_channel(gamma, x) * xhat + _per_channel(beta, x)

    @staticmethod
    def backward(ctx, dy):
        x, gamma, mu, inv_std, xhat = ctx.saved_tensors
        axes = _axes(x)
        m = x.numel() // x.shape[1]
        dgamma = (dy * xhat).sum(dim=axes)
        dbeta = dy.sum(dim=axes)
        dxhat = dy * _per_channel(gamma, x)
        if not ctx.training:
            # mu and var are constants: only the direct path xhat -> x remains.
            return dxhat * _per_channel(inv_std, x), dgamma, dbeta, None, None, None, None, None
        xc = x - _per_channel(mu, x)
        dvar = (dxhat * xc).sum(dim=axes) * -0.5 * inv_std ** 3
        dmu = dvar * (-2.0 / m) * xc.sum(dim=axes) - dxhat.sum(dim=axes) * inv_std
        dx = (dxhat * _per_channel(inv_std, x) + _per_channel(dvar, x) * 2.0 * xc / m
              + _per_channel(dmu, x) / m)
        return dx, dgamma, dbeta, None, None, None, None, None


def batch_norm(x: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor | None = None,
               running_var: Tensor | None = None, training: bool = True, momentum: float = 0.1,
               eps: float = 1e-5) -> Tensor:
    """Functional BatchNorm with the hand-derived backward; updates running stats in place."""
    if not training and (running_mean is None or running_var is None):
        raise ValueError("eval-mode batch_norm needs running_mean and running_var")
    return BatchNormFunction.apply(x, gamma, beta, running_mean, running_var, training, momentum, eps)


class ReferenceBatchNorm(nn.Module):
    """Drop-in for ``nn.BatchNorm1d/2d`` built on :class:`BatchNormFunction` (same state_dict keys)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                          self.training, self.momentum, self.eps)
