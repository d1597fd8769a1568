"""Optimizers built on the curvature engine."""

from lightning_curvature.optim.adahessian import AdaHessian, HessianBackwardMixin

__all__ = ["AdaHessian", "HessianBackwardMixin"]
