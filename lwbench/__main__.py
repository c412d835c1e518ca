import sys

from lwbench.cli import main

sys.exit(main())
