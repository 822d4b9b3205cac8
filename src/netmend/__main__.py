"""``python -m netmend ...``: the command line (also ``torchrun --nproc-per-node=N -m netmend``)."""

import sys

from netmend.cli import main

sys.exit(main())
