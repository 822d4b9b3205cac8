"""netmend: repair a trained PyTorch classifier from a set of its failures.

1. :func:`identify` scores every training example for how much it caused the failures
   (positive = harmful) and selects the causes;
2. :func:`treat` makes a repaired copy that forgets them;
3. :func:`evaluate` measures the repair on failures it never saw.

:func:`repair` runs 1 and 2 in one call; :class:`Repairer` repairs again as new failures
arrive (continual repair). The input model is never modified.
"""

from netmend._version import __version__
from netmend.api import (
    DEFAULT_IDENTIFY,
    DEFAULT_TREAT,
    Culprits,
    Identification,
    RepairResult,
    available,
    evaluate,
    identify,
    repair,
    treat,
    with_controls,
)
from netmend.continual import Repairer
from netmend.data.source import DataSource, as_source
from netmend.data.task import ClassificationTask, Task
from netmend.lab.validation import validate
from netmend.model.training import TrainConfig

__all__ = [
    "DEFAULT_IDENTIFY",
    "DEFAULT_TREAT",
    "ClassificationTask",
    "Culprits",
    "DataSource",
    "Identification",
    "RepairResult",
    "Repairer",
    "Task",
    "TrainConfig",
    "__version__",
    "as_source",
    "available",
    "evaluate",
    "identify",
    "repair",
    "treat",
    "validate",
    "with_controls",
]
