"""Offline stand-ins for the pretrained networks the built-in dataset needs: a DINOv2 and an "Inception".

No machine here can download DINOv2, Inception or LPIPS weights, yet AlignTok starts from a *pretrained*
foundation encoder and its metrics need pretrained feature networks. For ``builtin:shapes``:

* :mod:`.encoder`: the stand-in foundation encoder, a small ViT with DINOv2's exact architecture, saved
  as a transformers DINOv2 directory (``model.encoder=standin:NAME`` or its path).
* :mod:`.evalnet`: the evaluation CNN in Inception's role (gFD, rFD, class accuracy of samples).
* :mod:`.perceptual`: LPIPS's formula on that CNN's feature maps.
* :mod:`.text`: a small T5 encoder trained on the built-in captions (``standin:t5-shapes``), for text-to-image.
* :mod:`.judge`: the miniature GenEval's detector (Mask2Former's and the colour classifier's role) and
  :mod:`.scene_clip`: the scene CLIP (CLIP score's role), both trained on ``builtin:scenes`` renders; the
  metrics that use them (GenEval's rules, CLIP score) live in :mod:`aligntok.eval`.
* :mod:`.recipe`: the training both networks share; :mod:`.cache`: where trained recipes live.

Everything public of the image stand-ins is re-exported here (the text, judge and scene-CLIP modules
are imported by name, so importing this package stays light): ``from aligntok.standins import ensure_eval_network``.
"""

from aligntok.standins.cache import (
    CACHE_ENV,
    INFO_FILE,
    RECIPE_VERSION,
    TRAINING_RUNS,
    cache_root,
    read_standin_info,
)
from aligntok.standins.encoder import (
    STANDIN_ENCODERS,
    STANDIN_PREFIX,
    MixedEncoderSettings,
    StandinEncoderSettings,
    ensure_standin_encoder,
    probe_standin_encoder,
    resolve_encoder_spec,
)
from aligntok.standins.evalnet import (
    EVAL_CONFIG_FILE,
    EVAL_NETWORKS,
    EVAL_WEIGHTS_FILE,
    BuiltinEvalNetwork,
    EvalNetworkSettings,
    builtin_class_accuracy,
    builtin_fd,
    ensure_eval_network,
    evaluate_builtin,
    load_eval_network,
)
from aligntok.standins.perceptual import builtin_perceptual_distance
from aligntok.standins.recipe import HELDOUT_SEED

__all__ = [
    "CACHE_ENV",
    "EVAL_CONFIG_FILE",
    "EVAL_NETWORKS",
    "EVAL_WEIGHTS_FILE",
    "HELDOUT_SEED",
    "INFO_FILE",
    "RECIPE_VERSION",
    "STANDIN_ENCODERS",
    "STANDIN_PREFIX",
    "TRAINING_RUNS",
    "BuiltinEvalNetwork",
    "EvalNetworkSettings",
    "MixedEncoderSettings",
    "StandinEncoderSettings",
    "builtin_class_accuracy",
    "builtin_fd",
    "builtin_perceptual_distance",
    "cache_root",
    "ensure_eval_network",
    "ensure_standin_encoder",
    "evaluate_builtin",
    "load_eval_network",
    "probe_standin_encoder",
    "read_standin_info",
    "resolve_encoder_spec",
]
