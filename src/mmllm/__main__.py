import sys

from mmllm.cli import main

sys.exit(main())
