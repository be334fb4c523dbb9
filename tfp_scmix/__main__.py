import sys

from tfp_scmix.cli import main

sys.exit(main())
