import sys

from kubelora.trainer.cli import main

sys.exit(main())
