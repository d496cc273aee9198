"""mq-deploy: post-training quantization and deployment of Mamba models.

Importing the package is cheap: torch and friends are imported by the submodules that need them.
"""

__version__ = "0.1.0"

from mq_deploy.errors import MQError, MQInternalError, MQUserError  # noqa: F401
