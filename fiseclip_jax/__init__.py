"""fiseclip_jax: zero-shot industrial anomaly detection with CLIP, in pure JAX.

Everything is a pure function over parameter pytrees with frozen, hashable configs,
so callers can wrap it in their own `jit`, `vmap` and sharding.
"""

from .clip.model import CLIP
from .clip.checkpoint import load_clip, resolve_weights, save_clip
from .clip.config import PRESETS, CLIPConfig, TextConfig, VisionConfig, get_config
from .clip.convert import convert_clip
from .clip.modeling import encode_image, encode_text, init_clip
from .clip.preprocess import preprocess
from .clip.tokenizer import tokenize
from .detect import CategoryResult, detect, detect_category, encode_features, score_features
from . import methods  # the registry: methods.get(name), methods.names(), methods.register(name)
from .methods import AnoCLIPConfig, Detection, FiSeCLIPConfig, Method, MuScConfig, TTAConfig, default_match_layers
from .methods.tta import adapt
from .distributed import make_mesh, ring_mutual_scores, sharded_encode_features
from .bank import Bank, bank_threshold, build_bank, detect_with_bank, gate, load_bank, save_bank, update_bank
from .export import ExportedDetector, export_detector, load_exported
from . import evaluate  # the module: evaluate.evaluate(...), evaluate.evaluate_category(...)
from . import protocols  # published protocols as data: protocols.get("musc-paper", dataset="visa")
from .matching import MutualScores, mutual_scores
from .prompts import ANOCLIP_OBJECT, ANOCLIP_TEXTURE, WINCLIP, PromptSet, TextFeatures, text_features, \
    text_features_full

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "ANOCLIP_OBJECT", "ANOCLIP_TEXTURE", "AnoCLIPConfig", "CLIPConfig", "CategoryResult", "Detection",
    "FiSeCLIPConfig", "MuScConfig", "PRESETS", "PromptSet", "TextConfig", "TextFeatures", "VisionConfig",
    "WINCLIP", "convert_clip", "detect", "detect_category", "encode_features", "encode_image", "encode_text",
    "get_config", "init_clip", "load_clip", "preprocess", "resolve_weights", "save_clip", "score_features",
    "text_features", "text_features_full", "tokenize", "make_mesh", "ring_mutual_scores", "sharded_encode_features",
    "evaluate", "protocols", "MutualScores", "mutual_scores", "TTAConfig", "adapt", "methods", "Method",
    "default_match_layers",
    "Bank", "bank_threshold", "build_bank", "detect_with_bank", "gate", "load_bank", "save_bank", "update_bank",
    "ExportedDetector", "export_detector", "load_exported",
]
