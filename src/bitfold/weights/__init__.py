"""Weight formats: how a linear layer stores and multiplies its weight. Importing registers them."""
from bitfold.weights.base import WEIGHT_FORMATS, WeightFormat  # noqa: F401
from bitfold.weights import dense  # noqa: F401
from bitfold.weights import lowbit  # noqa: F401
from bitfold.weights import gguf  # noqa: F401
from bitfold.weights import nf4  # noqa: F401
