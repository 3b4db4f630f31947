"""``python -m mapc`` (and ``torchrun -m mapc``): the ``mapc`` command."""
import sys

from mapc.cli.main import main

sys.exit(main())
