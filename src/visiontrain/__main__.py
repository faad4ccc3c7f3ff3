"""``python -m visiontrain`` (and ``torchrun -m visiontrain``)."""

import sys

from visiontrain.cli import main

sys.exit(main())
