"""`python -m mosaic` and `accelerate launch -m mosaic ...`."""
import sys

from mosaic.cli import main

sys.exit(main())
