"""Published protocols as data: everything a like-for-like comparison with the authors' tables needs.

    p = fiseclip_jax.protocols.get("musc-paper", dataset="visa")
    method = p.method_config()                      # MuScConfig(act="gelu", k_list=(1, 8, 9))
    fiseclip_jax.evaluate.evaluate(params, cfg, "visa", root, method, out=out, **p.settings())

A protocol fixes the method's options, the input size and resize filter, the mask rule, the AUPRO
and image-AP variants, the metric resolution and the class names in the prompts, and names the
CLIP the authors ran. Parts that differ by dataset (MuSc's RsCIN k-list and mask rule, AnoVL's
VisA tiles and adapter) follow `dataset`. `evaluate --protocol NAME` applies one; a flag given on
the command line wins over it. What still differs from the authors' code is listed in README.md
("Reproducing the papers").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from . import methods
from .methods import TTAConfig
from .errors import FiseclipError


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One published protocol on one dataset (SPEC §4.2, §4.4, §4.5, §5, §6, §8)."""

    name: str
    dataset: str
    method: str  # the method the authors' table reports (default of method_config)
    overrides: Mapping[str, Mapping[str, Any]]  # per method this protocol covers: its field values
    size: int  # input side S (for tiles: the short side)
    resample: str  # preprocessing resize filter
    mask_rule: str
    aupro: str
    image_ap: str
    metric_resolution: str
    class_names: str
    weights: str  # the CLIP preset the authors ran
    source: str  # the authors' script this follows

    def method_config(self, method: str | None = None) -> methods.Method:
        """The method with this protocol's options (`method`: another method the protocol covers)."""
        name = method or self.method
        if name not in self.overrides:
            raise FiseclipError(f"protocol {self.name!r} covers the methods {', '.join(self.overrides)}, not {name!r}")
        return methods.get(name, **self.overrides[name])

    def settings(self) -> dict:
        """Keyword arguments of `evaluate.evaluate` (size, resample, mask rule, metric variants, protocol)."""
        return {"size": self.size, "resample": self.resample, "mask_rule": self.mask_rule, "aupro": self.aupro,
                "image_ap": self.image_ap, "metric_resolution": self.metric_resolution,
                "class_names": self.class_names, "protocol": self.name}


def _musc(dataset: str) -> Protocol:
    visa = dataset == "visa"
    return Protocol(
        name="musc-paper", dataset=dataset, method="musc",
        # GELU: the authors' OpenCLIP build at 518 px (SPEC §8); RsCIN k per dataset (SPEC §4.2)
        overrides={"musc": {"act": "gelu", "k_list": (1, 8, 9) if visa else (1, 2, 3)}},
        size=518, resample="bicubic",
        mask_rule="resize>0" if visa else "strict",  # datasets/visa.py `mask > 0`; mvtec.py int() of the resize
        aupro="legacy", image_ap="average_precision", metric_resolution="input", class_names="clean",
        weights="ViT-L/14@336", source="xrli-U/MuSc scripts/musc.sh, models/musc.py")


def _anoclip(dataset: str) -> Protocol:
    visa = dataset == "visa"
    # MVTec (vl_test.py): 22 views for the image score, TextAdapter; VisA (vis_test.py): two tiles, linear
    # Adapter, no views. Both keep one AdamW per class across images (carry_moments).
    plain = {"tiles": 2} if visa else {"views": True}
    tta = TTAConfig(adapter="linear" if visa else "text", carry_moments=True)
    return Protocol(
        name="anoclip-paper", dataset=dataset, method="anoclip+",
        overrides={"anoclip": plain, "anoclip+": {**plain, "tta": tta}},
        size=240, resample="bilinear", mask_rule="resize>0.5", aupro="legacy", image_ap="pr_auc",
        metric_resolution="input", class_names="anovl", weights="ViT-B-16-plus-240",
        source="hq-deng/AnoVL test_zero_shot.sh, vl_test.py (MVTec), vis_test.py (VisA)")


PROTOCOLS: dict[str, Callable[[str], Protocol]] = {"musc-paper": _musc, "anoclip-paper": _anoclip}


def names() -> tuple[str, ...]:
    return tuple(PROTOCOLS)


def get(name: str, dataset: str = "mvtec") -> Protocol:
    """The protocol `name` on `dataset` ("mvtec" | "visa" | "folder"; a folder follows MVTec's settings)."""
    try:
        return PROTOCOLS[name](dataset)
    except KeyError:
        raise FiseclipError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None


__all__ = ["PROTOCOLS", "Protocol", "get", "names"]
