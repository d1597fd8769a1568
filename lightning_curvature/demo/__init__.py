"""The demo: scikit-learn's handwritten digits, a small MLP, and CurvatureMonitor watching it.

:class:`DigitsDataModule` and :class:`DigitsClassifier` are ordinary Lightning classes, so
LightningCLI configs (``configs/*.yaml``) and benchmark scripts can name them by class path.
:func:`run_demo` trains one of two runs and returns its TensorBoard log directory:

* progressive sharpening (the default): minibatch SGD on the mean squared error against
  one-hot targets, where λmax rises while the model learns;
* the edge of stability (``edge_of_stability=True``): full-batch gradient descent with MSE
  on a subset, where λmax·η climbs to 2 and hovers there (Cohen et al., ICLR 2021);
* a byte-level transformer language model (``transformer=True``,
  :class:`CharTransformer` on :class:`StdlibTextDataModule`, the standard library's own
  source) trained with AdamW.

The data ships with scikit-learn (an optional dependency: ``pip install
"lightning_curvature[demo]"``); nothing is downloaded.
"""

from lightning_curvature.demo.data import (
    NUM_CLASSES,
    NUM_FEATURES,
    DigitsDataModule,
    load_digits_tensors,
)
from lightning_curvature.demo.model import DigitsClassifier, LowRankAdapter
from lightning_curvature.demo.run import (
    CHECKPOINT_NAME,
    EDGE_OF_STABILITY,
    SHARPENING,
    TRANSFORMER,
    DemoRecipe,
    StepProgressBar,
    demo_recipe,
    run_demo,
)
from lightning_curvature.demo.text import StdlibTextDataModule
from lightning_curvature.demo.transformer import CharTransformer

__all__ = [
    "CHECKPOINT_NAME",
    "EDGE_OF_STABILITY",
    "NUM_CLASSES",
    "NUM_FEATURES",
    "SHARPENING",
    "TRANSFORMER",
    "CharTransformer",
    "DemoRecipe",
    "DigitsClassifier",
    "DigitsDataModule",
    "LowRankAdapter",
    "StdlibTextDataModule",
    "StepProgressBar",
    "demo_recipe",
    "load_digits_tensors",
    "run_demo",
]
