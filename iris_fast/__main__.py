import sys

from iris_fast.cli import main

sys.exit(main())
