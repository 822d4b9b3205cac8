"""Ground-truth validation: what each identification method's scores are worth against retraining.

A :class:`Problem` is a small, fully deterministic classification task with planted label noise:
scikit-learn's digits, standardised, with a share of training labels flipped, and a float64
model trained **to convergence** (full-batch L-BFGS with strong-Wolfe line search on the summed
cross-entropy plus ``(l2/2)||theta||^2``; logistic regression is then polished with exact Newton
steps). Because the optimum is reached to machine precision, retraining without some examples
is a well-defined function of the examples kept, and its effect on the failures can be measured
exactly. :func:`ground_truth` measures

* the actual **leave-one-out** effect of training examples on the query failures' loss, and
* the actual per-failure query losses after retraining on random subsets (for the **linear
  datamodeling score**, LDS, of Park et al. 2023);

:func:`score_quality` compares a method's scores with both (and with the planted corruption),
and :func:`validate` runs every identification method, adds a **counterfactual** test (retrain
without each method's top-k and compare with removing k examples at random), and returns one
JSON-ready report.

Sign convention, everywhere: **positive = harmful**. The LOO effect of ``z`` is
``L_q(theta_hat) - L_q(theta_{-z})``, positive when removing ``z`` lowers the summed loss of
the query failures. For a subset ``S``, scores ``s`` predict the loss after retraining on ``S``
as ``L_q(theta_hat) - sum_{z not in S} s(z)`` (removing harmful examples lowers the loss).

Retraining is warm-started from the trained parameters (for the non-convex MLP this measures
the effect within the trained basin, the usual convention). For logistic regression all refits
are batched: many weight masks ``w in {0, 1}^N`` are solved at once by damped Newton on the
weighted objective ``sum_n w_n CE_n(theta) + (l2/2)||theta||^2``; leave-one-out refits use the
full-data Hessian corrected by a rank-``C`` Woodbury downdate, so they converge in 2-4 steps.

The code is split along its seams: :mod:`.refit` (batched exact refits), :mod:`.problem` (the
task), :mod:`.groundtruth` (leave-one-out, LDS, noise floor, :func:`score_quality`),
:mod:`.counterfactual`, :mod:`.harness` (:func:`validate`) and :mod:`.render` (markdown
tables). Every public name is re-exported here.
"""

from netmend.lab.validation.counterfactual import counterfactual
from netmend.lab.validation.groundtruth import (
    GroundTruth,
    ground_truth,
    lds_predictions,
    score_quality,
)
from netmend.lab.validation.harness import check_methods, validate
from netmend.lab.validation.problem import DATASETS, DEFAULT_L2, MODELS, Problem, make_problem
from netmend.lab.validation.refit import DT, GRAD_TOL, LogregSolver
from netmend.lab.validation.render import TABLE_COLUMNS, curve_table, table

__all__ = [
    "DATASETS",
    "DEFAULT_L2",
    "DT",
    "GRAD_TOL",
    "MODELS",
    "TABLE_COLUMNS",
    "GroundTruth",
    "LogregSolver",
    "Problem",
    "check_methods",
    "counterfactual",
    "curve_table",
    "ground_truth",
    "lds_predictions",
    "make_problem",
    "score_quality",
    "table",
    "validate",
]
