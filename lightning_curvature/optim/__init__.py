"""What the optimizer knows: stability thresholds (:mod:`.stability`), the preconditioner
read from an adaptive optimizer's state (:mod:`.preconditioners`), and AdaHessian, an
optimizer built on the curvature engine (:mod:`.adahessian`)."""

from lightning_curvature.optim.adahessian import AdaHessian, HessianBackwardMixin

__all__ = ["AdaHessian", "HessianBackwardMixin"]
