import sys

from memc.cli import main

sys.exit(main())
