"""Model architectures, one file per family. Importing this package registers them all."""
from bitfold.models.base import MODELS  # noqa: F401
from bitfold.models import llama, qwen2, qwen3  # noqa: F401
