import sys

from pipeline.entrypoints.cli import main

sys.exit(main())
