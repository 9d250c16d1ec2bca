from iris_fast.cli import main
import sys
sys.exit(main())
