"""`python -m batchdeck`: the command line."""
import sys

from batchdeck.cli import main

sys.exit(main())
