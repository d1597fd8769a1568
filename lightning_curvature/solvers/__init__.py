"""(H + εI)⁻¹b with the curvature: Krylov solves (CG, MINRES) on any operator
(:mod:`.krylov`), and the exact linear-in-depth solve for Linear/elementwise chains
(:mod:`.chain`, its model parsing in :mod:`.chain_model`)."""

from lightning_curvature.solvers.chain import ChainSolveResult, mlp_chain_solve
from lightning_curvature.solvers.krylov import SolveResult, solve

__all__ = ["ChainSolveResult", "SolveResult", "mlp_chain_solve", "solve"]
