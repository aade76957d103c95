"""The model card's multi-label wording: what the model answers, how to read its thresholds, how to use it.

`finetune/model_card.py` builds every card; for a multi-label run (`studio.multilabel` in config.json) it
takes the intro, limitations and usage text from here, so a reader (and a timm user) applies a sigmoid and
each label's own threshold instead of a softmax and an argmax.
"""

from __future__ import annotations

from typing import Any

PR_CURVES_FILE = "pr_curves.png"

LIMITATIONS = (
    "## Limitations\n\nThe scores above come from validation images taken from the same collection as the "
    "training images; expect lower scores on photos that look different (other cameras, lighting, "
    "backgrounds). The thresholds were fitted on those same validation images, so they suit images like "
    "them; a label's probability is independent of the others' and does not sum with them to 1."
)

CONFIDENCE = (  # the app's model panel, in place of the softmax temperature and "none of these" lines
    "Confidence: an independent sigmoid probability per label (they need not sum to 1); a label is "
    "answered when it reaches its own threshold, fitted on the validation images for that label's best F1."
)


def intro(num_labels: int, weights_file: str, config_file: str) -> str:
    return (
        f"A multi-label image classifier: it names every one of its {num_labels} labels that a photo shows "
        "(none, one or several), fine-tuned with Image Recognition Studio. Each label has an independent "
        "sigmoid probability and its own threshold, chosen on the validation images to maximise that label's "
        f"F1. It is a plain timm model: the weights are in `{weights_file}`, the labels, thresholds "
        f"(`studio.multilabel.thresholds`) and preprocessing in `{config_file}`."
    )


def scores(metrics: dict[str, Any]) -> list[tuple[str, str, float, str]]:
    """(metric id, name, value, config) for the card's model-index: mAP and micro F1."""
    found = []
    if isinstance(metrics.get("val_map"), (int, float)):
        found.append(("average_precision", "mAP", float(metrics["val_map"]), "macro"))
    if isinstance(metrics.get("val_micro_f1"), (int, float)):
        found.append(("f1", "Micro F1", float(metrics["val_micro_f1"]), "micro"))
    return found


def usage(checkpoint: str, ours: str, timm_url: str) -> str:
    return f"""## How to use

With [timm]({timm_url}) alone (labels, thresholds and preprocessing come with the model):

```python
import json

import timm
import torch
from PIL import Image

model = timm.create_model("{checkpoint}", pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
labels = model.pretrained_cfg["label_names"]
thresholds = json.load(open("config.json"))["studio"]["multilabel"]["thresholds"]  # from the model's folder
with torch.no_grad():
    probs = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0)).sigmoid()[0]
print([(label, float(p)) for label, p in zip(labels, probs) if p >= thresholds[label]])
```

With Image Recognition Studio (the demo app, or predictions from the command line: a `labels` column holds
every label above its threshold):

```bash
python app.py --checkpoint {ours}
python -m finetune.predict --checkpoint {ours} photo.jpg
```"""
