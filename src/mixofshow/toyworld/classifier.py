"""The toy world's attribute classifier: a small CNN that reads shape, colour, pattern, accessory, background and
which concept (if any) from an object crop; saved as safetensors with its label names in the metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .dataset import LABELS, crop_boxes
from .models import toyworld_asset_folder

CROP_SIZE = 32
OBJECT_CROP_SCALE = 1.4  # crop side / the object's box side, when classifying a known object
CLASSIFIER_FILE = "classifier.safetensors"
_FORMAT = "mixofshow.toyworld.classifier/1"


class AttributeClassifier(nn.Module):
    """A five-stage CNN on `crop_size` x `crop_size` crops in [-1, 1], one linear head per attribute.

    Args:
        heads: {head name: class names}, e.g. `LABELS`.
        width: Channels of the first stage (doubling twice).
        crop_size: Input side in pixels.
    """

    def __init__(self, heads: dict[str, tuple[str, ...]] = LABELS, width: int = 32, crop_size: int = CROP_SIZE):
        super().__init__()
        self.heads = {name: tuple(classes) for name, classes in heads.items()}
        self.width, self.crop_size = width, crop_size

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())

        w = width
        self.features = nn.Sequential(
            block(3, w, 1), block(w, w, 1),  # (B, w, S, S)
            block(w, 2 * w, 2), block(2 * w, 2 * w, 1),  # (B, 2w, S/2, S/2)
            block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1),  # (B, 4w, S/4, S/4)
            block(4 * w, 4 * w, 2),  # (B, 4w, S/8, S/8)
        )
        features = 4 * w * (crop_size // 8) ** 2
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(features, 128), nn.SiLU())
        self.out = nn.ModuleDict({name: nn.Linear(128, len(classes)) for name, classes in self.heads.items()})

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head: {name: (B, classes)} for crops (B, 3, S, S) in [-1, 1]."""
        if crops.shape[-2:] != (self.crop_size, self.crop_size):
            raise ValueError(f"crops are {tuple(crops.shape[-2:])}, the classifier takes "
                             f"{self.crop_size}x{self.crop_size}; crop with `crop_boxes(..., size={self.crop_size})`.")
        hidden = self.trunk(self.features(crops))
        return {name: head(hidden) for name, head in self.out.items()}

    @torch.no_grad()
    def predict(self, images, boxes=None) -> list[dict[str, str]]:
        """Class names per head for each image (or each box of each image).

        Args:
            images: A PIL image, a list of them, or a (B, 3, H, W) float tensor in [-1, 1].
            boxes: Optional (B, 4) boxes (x0, y0, x1, y1, fractions of the side), one per image; None classifies
                each whole image (resized to the crop size).

        Returns:
            One {head: class name} dict per image.
        """
        return self.answers(self.probabilities(images, boxes))

    def answers(self, probabilities: dict[str, torch.Tensor]) -> list[dict[str, str]]:
        """The most probable class name per head, one dict per row of `probabilities` (as `predict` returns)."""
        picks = {name: p.argmax(dim=1).tolist() for name, p in probabilities.items()}
        count = len(next(iter(picks.values())))
        return [{name: self.heads[name][picks[name][i]] for name in self.heads} for i in range(count)]

    @torch.no_grad()
    def probabilities(self, images, boxes=None) -> dict[str, torch.Tensor]:
        """Class probabilities per head, {head: (B, classes)} (classes in `self.heads[head]` order); arguments as
        `predict`."""
        device = next(self.parameters()).device
        if isinstance(images, Image.Image):
            images = [images]
        if not isinstance(images, torch.Tensor):
            arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
            images = torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1
        images = images.to(device, torch.float32)
        whole = boxes is None
        if whole:
            boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * len(images))
        crops = crop_boxes(images, torch.as_tensor(boxes, dtype=torch.float32, device=device), self.crop_size,
                           scale=1.0 if whole else OBJECT_CROP_SCALE)
        return {name: logit.softmax(dim=1).cpu() for name, logit in self(crops).items()}


def save_classifier(model: AttributeClassifier, path: str | os.PathLike) -> Path:
    """Write the classifier as one safetensors file of fp16 weights (a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": _FORMAT, "heads": json.dumps(model.heads), "width": str(model.width),
                "crop_size": str(model.crop_size)}
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(state, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> AttributeClassifier:
    """Load a classifier written by `save_classifier` (default: the one shipped in `mixofshow/assets/toyworld/`)."""
    path = Path(path) if path is not None else toyworld_asset_folder() / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no toy-world classifier here; train one with scripts/train_toyworld.py.")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a toy-world classifier file (format {metadata.get('format')!r}, expected "
                         f"{_FORMAT!r}).")
    heads = {name: tuple(classes) for name, classes in json.loads(metadata["heads"]).items()}
    model = AttributeClassifier(heads, int(metadata["width"]), int(metadata["crop_size"]))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()
