"""``tl-fast annotate``: run a classifier densely over an image folder and write a label store.

A machine annotator is an ordinary image classifier whose global pooling is removed, so that its
classifier is applied at every position of the last feature map and it emits a score map
``[K, h, w]`` per image instead of one K-vector. The top-k scores per position (and their class ids)
are written to a :class:`tl_fast.store.StoreWriter` store keyed by the image's relative path.
**Scores are the classifier's logits** (before any softmax), as in the public LV-ViT annotator maps;
the token-label ops apply the softmax after resampling.

One job per module:

* :mod:`.models` — build a classifier (timm name or ``module:callable``), load its checkpoint, read
  its preprocessing;
* :mod:`.dense` — :class:`DenseClassifier`, the model with its head applied per position;
* :mod:`.images` — the image listing (:class:`tl_fast.dataset.ImageFolderIndex`), decoding, batches;
* :mod:`.partial` — the resumable partial results (blocks) and their writer thread;
* :mod:`.ranks` — torchrun's process group, the control messages, the global progress bar;
* :mod:`.run` — :func:`annotate`, the run and the assembly of the store;
* :mod:`.command` — the ``tl-fast annotate`` command line.
"""
from .command import register
from .dense import DenseClassifier
from .images import ImageList, list_images
from .models import build_model, data_config, load_weights, weights_digest
from .partial import PARTIAL_SUFFIX
from .run import AnnotateResult, annotate

__all__ = ["annotate", "AnnotateResult", "DenseClassifier", "build_model", "data_config", "load_weights",
           "weights_digest", "list_images", "ImageList", "register", "PARTIAL_SUFFIX"]
