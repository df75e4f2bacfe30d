import sys

from qosora.cli import main

sys.exit(main())
