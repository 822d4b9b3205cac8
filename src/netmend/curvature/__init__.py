"""Curvature of the summed log-likelihood: diagonal Fisher, full Fisher/GGN/Hessian products,
KFAC and EK-FAC factors, and the damped solves the identification and treatment methods use.

Modules: :mod:`~netmend.curvature.hooks` (the layer hooks both estimators read),
:mod:`~netmend.curvature.fisher` (per-example gradients, the diagonal Fisher, the
:class:`Curvature` operator and its solvers), :mod:`~netmend.curvature.kfac` (Kronecker
factors, eigenvalue correction).
"""

from netmend.curvature.fisher import (
    CURVATURE_KINDS,
    DENSE_MAX_PARAMS,
    SOLVER_OPTIONS,
    Curvature,
    CurvatureKind,
    cg,
    dense_curvature,
    fisher_diag_sum,
    per_example_grad_products,
    per_example_grads,
    solver_options,
)
from netmend.curvature.kfac import (
    DEFAULT_FISHER_TYPE,
    EWC_FISHER_TYPE,
    FISHER_TYPES,
    KRONECKER_KINDS,
    KroneckerFactors,
    LayerFactors,
    eigencorrect,
    kronecker_factors,
    kronecker_layers,
)

__all__ = [
    "CURVATURE_KINDS",
    "DEFAULT_FISHER_TYPE",
    "DENSE_MAX_PARAMS",
    "EWC_FISHER_TYPE",
    "FISHER_TYPES",
    "KRONECKER_KINDS",
    "SOLVER_OPTIONS",
    "Curvature",
    "CurvatureKind",
    "KroneckerFactors",
    "LayerFactors",
    "cg",
    "dense_curvature",
    "eigencorrect",
    "fisher_diag_sum",
    "kronecker_factors",
    "kronecker_layers",
    "per_example_grad_products",
    "per_example_grads",
    "solver_options",
]
