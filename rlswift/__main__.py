import sys

from rlswift.cli import main

sys.exit(main())
