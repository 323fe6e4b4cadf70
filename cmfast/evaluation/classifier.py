"""A small digits classifier whose penultimate features give a "digits FID" without downloading anything.

Trained by the project (`cmfast train-classifier`, seed 0) on the train split of the built-in 8x8 digits, checked on
the 300-image test split, and shipped fp16 as cmfast/assets/digits-classifier.safetensors, so digits evaluations are
deterministic. Inputs are uint8 grayscale digits; sizes above 8x8 (multiples of 8) are area-averaged down to 8x8.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn
from tqdm import tqdm

from ..checkpoint import ASSETS
from ..data import load_digits
from ..io import atomic_write_bytes

FORMAT_NAME = "cmfast-classifier"
SHIPPED_CLASSIFIER = "digits-classifier"  # cmfast/assets/digits-classifier.safetensors
RESOLUTION = 8


@dataclass(frozen=True)
class ClassifierConfig:
    width: int = 32  # channels of the first convolution (then 2x, 4x)
    feature_dim: int = 64  # size of the penultimate layer: the feature space of the digits FID
    num_classes: int = 10


class DigitsClassifier(nn.Module):
    """conv-conv-pool-conv-pool, a linear layer to `feature_dim` (the features), then ReLU, dropout and the logits.

    Takes (B, 1, 8, 8) float images in [-1, 1]; about 0.13M parameters with the default config.
    """

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        w = config.width
        self.config = config
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(16 * w, config.feature_dim),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(config.feature_dim, config.num_classes)
        # Set after training so that the features of the training digits have unit mean variance per dimension:
        # FID and KID then come out in units that do not depend on how large the trained activations happen to be.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: Tensor) -> Tensor:
        """(B, 1, 8, 8) in [-1, 1] -> (B, feature_dim) penultimate pre-activations (before the ReLU, so no unit is
        constantly zero and every dimension carries information), times `feature_scale`."""
        return self.body(x) * self.feature_scale

    def logits(self, features: Tensor) -> Tensor:
        return self.head(self.dropout(F.relu(features / self.feature_scale)))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.features(x))


def prepare(images) -> Tensor:
    """uint8 digits, (N, H, W, 1) as `cmfast sample` writes them or (N, 1, H, W), H a multiple of 8 -> (N, 1, 8, 8)
    float32 in [-1, 1]. Larger images are area-averaged (in [0, 255], before rounding nothing) down to 8x8."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"the digits classifier takes 4-d uint8 images, got {tuple(x.shape)} {x.dtype}")
    if x.shape[-1] == 1 and x.shape[1] != 1:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 1:
        raise ValueError(
            f"the digits classifier takes 1-channel (grayscale) images, got {x.shape[1]} channels; "
            "use the inception feature space for RGB images"
        )
    size = x.shape[-1]
    if x.shape[-2] != size or size < RESOLUTION or size % RESOLUTION:
        raise ValueError(f"the digits classifier takes square images of 8x8, 16x16, ..., got {tuple(x.shape[-2:])}")
    x = x.float()
    if size != RESOLUTION:
        x = F.avg_pool2d(x, size // RESOLUTION)
    return x / 127.5 - 1


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random small affine maps (rotation +-12 degrees, scale 0.9..1.1, shift +-1 pixel) of [-1, 1] digits;
    the background (-1) fills the borders."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=generator) * 2 - 1
    angle, scale, shift = u[:, 0] * math.radians(12), 1 + 0.1 * u[:, 1], u[:, 2:] * (2 / RESOLUTION)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy on prepared (N, 1, 8, 8) images."""
    model.eval()
    return float((model(images).argmax(1) == labels).float().mean())


def train_classifier(
    steps: int = 3000, batch: int = 128, lr: float = 2e-3, seed: int = 0, progress: bool = True
) -> tuple[DigitsClassifier, dict]:
    """Train on the digits train split (1497 images, augmented) with AdamW and a cosine learning-rate decay.

    Returns the model (eval mode) and a record with the run's settings and its test-split accuracy. Deterministic for
    a seed on one machine: the weights come from torch's seeded RNG, batches and augmentations from a seeded
    generator.
    """
    train, test = load_digits(RESOLUTION, "train"), load_digits(RESOLUTION, "test")
    x_train, y_train = train.batch(range(len(train)))
    x_test, y_test = test.batch(range(len(test)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
        generator = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
        model.train()
        for _ in tqdm(range(steps), desc="classifier", unit="step", disable=not progress):
            idx = torch.randint(len(x_train), (batch,), generator=generator)
            loss = F.cross_entropy(model(_augment(x_train[idx], generator)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        model.feature_scale.fill_(float(model.features(x_train).var(0).mean().rsqrt()))
    record = dict(steps=steps, batch=batch, lr=lr, seed=seed, train_accuracy=accuracy(model, x_train, y_train))
    record["test_accuracy"] = accuracy(model, x_test, y_test)
    return model, record


def round_weights(model: DigitsClassifier, dtype: torch.dtype) -> DigitsClassifier:
    """Round the weights through `dtype` (as a shipped fp16 file stores them), keeping them float32."""
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(t.to(dtype).float())
    return model


def save_classifier(model: DigitsClassifier, path: str | os.PathLike, record: dict, dtype=None) -> None:
    """Weights + config + `record` (training settings, accuracies) as one .safetensors file, written atomically."""
    meta = {"format": FORMAT_NAME, "version": 1, "config": asdict(model.config), "record": record}
    tensors = {
        k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={FORMAT_NAME: json.dumps(meta)}))


def load_classifier(spec: str | os.PathLike = SHIPPED_CLASSIFIER) -> tuple[DigitsClassifier, dict]:
    """The shipped classifier (by name) or one written by `save_classifier`; returns (model in eval mode, record)."""
    path = ASSETS / f"{SHIPPED_CLASSIFIER}.safetensors" if str(spec) == SHIPPED_CLASSIFIER else spec
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such classifier file (train one with `cmfast train-classifier --out FILE`)")
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(FORMAT_NAME)
            state = {k: fh.get_tensor(k).float() for k in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    if raw is None:
        raise ValueError(f"{path}: not a cmfast classifier (no {FORMAT_NAME} metadata)")
    meta = json.loads(raw)
    model = DigitsClassifier(ClassifierConfig(**meta["config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the classifier: {str(err).splitlines()[0]}") from None
    return model.eval().requires_grad_(False), meta.get("record", {})
