"""Attention backends (kernel families) and the per-step attention metadata. Importing this
package registers every backend."""
from bitfold.attention.base import (ATTENTION_BACKENDS, AttentionBackend, AttentionMetadata,  # noqa: F401
                                    AttentionOps, select_backend)
from bitfold.attention import cpu, torch_ref, triton  # noqa: F401
