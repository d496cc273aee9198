import sys

from mq_deploy.cli.main import main

sys.exit(main())
