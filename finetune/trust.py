"""What a run says about trusting its answers: its temperature and its "none of these" rule, read once.

Training stores two sections in config.json's `studio` (see `finetune.trust_fit`): `calibration`
(`temperature` and the ECE/NLL figures) and `ood` (the method, its threshold and what it needs, such as
class means). `read_trust(run)` turns them into `TrustSettings`, which `finetune.inference.Classifier`
applies for every runtime: probabilities are softmax(logits / T), and each image gets an `ood_score`
(higher = further from the training classes) and, when rejection is on, an `unknown` flag. A run trained
before this existed has neither: T = 1 and no score, today's behaviour, said once in the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from finetune.ood import Rejector

logger = logging.getLogger(__name__)

# `--reject` on a model with no stored rule (the embedded ImageNet model, older runs): "unknown" below this
# top-1 probability. A plain confidence floor, not fitted to anything: fitted rules come from training.
FALLBACK_MIN_CONFIDENCE = 0.5

FEATURES_OUTPUT = "features"  # name of the ONNX export's second output (penultimate features)
_told_uncalibrated: set[str] = set()  # runs already reported as uncalibrated, so the log says it once


@dataclass(frozen=True)
class TrustSettings:
    """A run's temperature (1.0 = raw softmax) and its OOD rule (None = no score, nothing rejected)."""

    temperature: float = 1.0
    rejector: Rejector | None = None
    is_calibrated: bool = False

    @property
    def needs_features(self) -> bool:
        return self.rejector is not None and self.rejector.needs_features

    def with_fallback_rule(self) -> TrustSettings:
        """These settings with the confidence-floor rule when there is no fitted one (see FALLBACK_...)."""
        if self.rejector is not None:
            return self
        rule = Rejector("max_softmax", -FALLBACK_MIN_CONFIDENCE, float("nan"))
        return TrustSettings(self.temperature, rule, self.is_calibrated)


def read_trust(config: dict[str, Any], name: str = "", shape: tuple[int, int] | None = None) -> TrustSettings:
    """The trust settings in a run's config.json; missing or unreadable sections mean today's behaviour.

    `shape` (classes, feature size) of the model checks stored class means, so a damaged or foreign rule is
    ignored with a warning here rather than failing every request later.
    """
    studio = config.get("studio") if isinstance(config.get("studio"), dict) else {}
    calibration, stored_ood = studio.get("calibration") or {}, studio.get("ood") or {}
    calibration = calibration if isinstance(calibration, dict) else {"temperature": "not a section"}
    stored_ood = stored_ood if isinstance(stored_ood, dict) else {"method": "not a section"}
    temperature = 1.0
    try:
        temperature = float(calibration.get("temperature", 1.0))
        if not 0 < temperature < float("inf"):
            raise ValueError(f"temperature {temperature}")
    except (TypeError, ValueError) as error:
        logger.warning("Ignoring the stored temperature of %s (%s); using 1.", name or "this run", error)
        temperature = 1.0
    rejector = None
    if stored_ood:
        try:
            rule = Rejector.from_dict(stored_ood)
            if shape is not None and rule.means is not None and rule.means.shape != shape:
                raise ValueError(f"class means of shape {rule.means.shape}, the model has {shape}")
            rejector = rule
        except (KeyError, TypeError, ValueError) as error:
            logger.warning("Ignoring the stored OOD rule of %s (%s).", name or "this run", error)
    if not calibration and not stored_ood and name not in _told_uncalibrated:
        _told_uncalibrated.add(name)
        logger.info(
            "%s has no calibration or 'none of these' threshold (trained before they existed, or not by "
            "finetune): probabilities are the raw softmax and no image is flagged unknown.",
            name or "This model",
        )
    return TrustSettings(temperature, rejector, is_calibrated="temperature" in calibration)


class LogitsAndFeatures(torch.nn.Module):
    """A timm model that returns (logits, penultimate features) from one pass, for inference and export.

    Logits come from the model's own `forward_head`, so they are exactly `model(x)`; the features are
    `forward_head(..., pre_logits=True)`, what the classifier layer sees.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature_map = self.model.forward_features(pixels)
        logits = self.model.forward_head(feature_map)
        features = self.model.forward_head(feature_map, pre_logits=True)
        return logits, features.flatten(1)


def trust_summary(config: dict[str, Any], trust: TrustSettings, reject: bool) -> dict[str, Any]:
    """The figures a model card and the app's model panel show: the temperature and its validation ECE,
    and the rejection rule (numbers only, and a method name from `finetune.ood.METHODS`)."""
    calibration = (config.get("studio") or {}).get("calibration") or {}
    stored_ood = (config.get("studio") or {}).get("ood") or {}
    summary: dict[str, Any] = {"temperature": trust.temperature, "is_calibrated": trust.is_calibrated}
    for key in ("ece_before", "ece_after", "nll_before", "nll_after"):
        if isinstance(calibration.get(key), (int, float)):
            summary[key] = float(calibration[key])
    summary["reject"] = bool(reject and trust.rejector is not None)
    if trust.rejector is not None:
        summary["ood_method"] = trust.rejector.method
        summary["ood_threshold"] = trust.rejector.threshold
        if trust.rejector.accept_rate == trust.rejector.accept_rate:  # NaN for the fallback floor
            summary["accept_rate"] = trust.rejector.accept_rate
        if isinstance(stored_ood.get("val_accepted"), (int, float)):
            summary["val_accepted"] = float(stored_ood["val_accepted"])
    return summary


def describe_trust(summary: dict[str, Any]) -> list[str]:
    """Plain sentences about a model's confidence and its "none of these" rule, for cards and panels."""
    if summary.get("is_calibrated"):
        line = f"Confidence: calibrated on the validation split (temperature {summary['temperature']:.2f}"
        if "ece_before" in summary and "ece_after" in summary:
            # T was fitted on these images: `finetune.evaluate` on held-out images gives an unbiased ECE
            line += (
                f"; ECE {summary['ece_before']:.1%} -> {summary['ece_after']:.1%} on those same images, "
                "so the second figure is optimistic"
            )
        lines = [line + ")."]
    else:
        lines = ["Confidence: raw softmax (no calibration stored for this model)."]
    method = summary.get("ood_method")
    if method is None:
        lines.append("None of these: no rejection rule for this model.")
    elif "accept_rate" in summary:
        state = "on" if summary.get("reject") else "off"
        lines.append(
            f"None of these: {state}; {method} score, threshold {summary['ood_threshold']:.4g}, "
            f"fitted to accept {summary['accept_rate']:.0%} of validation images"
            + (f" ({summary['val_accepted']:.1%} accepted)." if "val_accepted" in summary else ".")
        )
    else:
        lines.append(
            f"None of these: {'on' if summary.get('reject') else 'off'}; unknown below "
            f"{-summary['ood_threshold']:.0%} top-1 probability (not fitted to this model)."
        )
    return lines


def card_section(config: dict[str, Any], has_reliability_png: bool = False) -> str:
    """The model card's "Confidence and unknown images" section: figures and how to apply T outside us."""
    studio = config.get("studio") or {}
    if not studio.get("calibration") and not studio.get("ood"):
        return ""  # a run from before calibration: the card says nothing rather than "T = 1"
    trust = read_trust(config, "this run")
    lines = ["## Confidence and unknown images", ""]
    lines += [f"- {line}" for line in describe_trust(trust_summary(config, trust, reject=True))]
    lines.append(
        f"\nThe probabilities this run reports are `softmax(logits / {trust.temperature:.4f})`, the "
        "temperature stored in `config.json` under `studio.calibration.temperature`. Loaded with timm alone "
        '(`timm.create_model("local-dir:...")` or `hf-hub:`), the model returns raw logits: divide them by '
        "that temperature before the softmax to get the calibrated confidence."
    )
    if trust.rejector is not None:
        lines.append(
            "\nAn image whose out-of-distribution score (`ood_score`, higher = further from the training "
            "classes) is above the threshold is reported as *none of these* (`unknown`), with its closest "
            "classes still listed; `python -m finetune.predict --no-reject` turns the flag off."
        )
    if has_reliability_png:
        lines.append("\n![Reliability diagram](reliability.png)")
    return "\n".join(lines)
