"""``python -m quaff_fx.cli`` (torchrun and accelerate launch use it)."""
import sys

from . import main

sys.exit(main())
