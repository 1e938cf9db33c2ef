"""KV-cache codecs: how K/V pages are stored. Importing this package registers them all."""
from bitfold.kvcache.codecs.base import KV_CODECS, KVCodec  # noqa: F401
from bitfold.kvcache.codecs import dense  # noqa: F401
