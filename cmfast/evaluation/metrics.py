"""Feature spaces and sample-quality metrics: FID, KID, Inception Score and precision/recall.

Two feature spaces:
- "digits": the project's shipped digits classifier (penultimate features, logits for the score); no download.
- "inception": the standard TF-Inception port of torch-fidelity (pool3 2048-d features and the unbiased logits, the
  FID/IS network of Heusel et al. and Salimans et al., bit-exact with the TensorFlow original). Its weights come from
  a local file, torch's hub cache, or a download when the machine is online.

FID is `frechet.frechet_distance` on the fitted Gaussians; KID (Binkowski et al.), the score (IS) and precision/recall
(Kynkaanniemi et al.) are torch-fidelity's functions on the same features.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ..data import load_dataset
from .classifier import SHIPPED_CLASSIFIER, load_classifier, prepare
from .frechet import frechet_distance, gaussian_statistics, is_statistics_file, load_statistics, save_statistics

FEATURE_SPACES = ("digits", "inception")
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = os.path.basename(INCEPTION_URL)


def _fidelity(module: str):
    """A torch-fidelity module, or a one-line ValueError saying how to install the library."""
    import importlib

    try:
        return importlib.import_module(f"torch_fidelity.{module}")
    except ImportError as err:
        raise ValueError(f"the metrics need torch-fidelity ({err}): pip install 'torch-fidelity>=0.4'") from None


def as_nchw(images) -> Tensor:
    """uint8 images, NHWC (as `cmfast sample` writes them) or NCHW with 1 or 3 channels -> an NCHW uint8 tensor."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected 4-d uint8 images, got {tuple(x.shape)} {x.dtype}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    return x.contiguous()


class DigitsFeatures:
    """The shipped digits classifier as a feature space: (N, 64) features and (N, 10) logits."""

    name = "digits"

    def __init__(self, classifier: str | os.PathLike = SHIPPED_CLASSIFIER, device: str | torch.device = "cpu"):
        self.model, self.record = load_classifier(classifier)
        self.model.to(device)
        self.device = torch.device(device)
        self.source = str(classifier)

    @torch.no_grad()
    def __call__(self, images, batch: int = 1000, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        x = prepare(as_nchw(images))
        feats, logits = [], []
        for chunk in tqdm(x.split(batch), desc="digits features", unit="batch", disable=not progress):
            f = self.model.features(chunk.to(self.device))
            feats.append(f.double().cpu())
            logits.append(self.model.logits(f).double().cpu())
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def inception_weights(path: str | os.PathLike | None = None) -> str:
    """A readable local file with torch-fidelity's Inception weights: `path`, else $CMFAST_INCEPTION_WEIGHTS, else
    torch's hub cache (downloading into it when online). Raises a one-line ValueError when none can be had."""
    path = path or os.environ.get("CMFAST_INCEPTION_WEIGHTS")
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"Inception weights {path}: no such file (expected {INCEPTION_FILE})")
        return os.fspath(path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, cached, progress=False)
        except Exception as err:  # URLError, HTTPError, OSError, hash errors: all mean "not available"
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"Inception weights are not in {cached} and downloading {INCEPTION_URL} failed ({reason}); "
                f"on an offline machine pass --inception-weights FILE (or set CMFAST_INCEPTION_WEIGHTS)"
            ) from None
    return cached


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a torch.save'd state dict, unpickled with weights_only=True (nothing but tensors and plain
    containers can load), or a one-line ValueError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"Inception weights {path}: not a readable state dict ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"Inception weights {path}: not a state dict of tensors")
    return state


def build_from_state_dict(build, state: dict[str, Tensor]):
    """build(path) for a constructor that insists on reading its weights from a file (torch-fidelity's unpickles it
    with weights_only=False): it gets a private copy of the verified `state`, written here and deleted after, so the
    user's file is unpickled once, safely, and never by the constructor."""
    with tempfile.TemporaryDirectory(prefix="cmfast-weights-") as folder:
        private = os.path.join(folder, "state_dict.pt")
        torch.save(state, private)
        return build(private)


class InceptionFeatures:
    """torch-fidelity's TF-Inception port: (N, 2048) pool3 features and (N, 1008) unbiased logits per image.

    Images are uint8; grayscale ones are repeated to 3 channels, and torch-fidelity resizes to 299x299 as TF 1.x did.
    """

    name = "inception"

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        FeatureExtractorInceptionV3 = _fidelity("feature_extractor_inceptionv3").FeatureExtractorInceptionV3
        self.source = inception_weights(weights)
        state = read_state_dict(self.source)
        try:
            self.model = build_from_state_dict(
                lambda path: FeatureExtractorInceptionV3(
                    "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
                ),
                state,
            )
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"Inception weights {self.source}: do not fit the network ({first})") from None
        self.model.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images, batch: int = 64, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        x = as_nchw(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats, logits = [], []
        for chunk in tqdm(x.split(batch), desc="inception features", unit="batch", disable=not progress):
            f, logit = self.model(chunk.to(self.device))
            feats.append(f.double().cpu())
            logits.append(logit.double().cpu())
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def feature_space(name: str, device="cpu", classifier=SHIPPED_CLASSIFIER, inception_weights_path=None):
    if name == "digits":
        return DigitsFeatures(classifier, device=device)
    if name == "inception":
        return InceptionFeatures(inception_weights_path, device=device)
    raise ValueError(f"unknown feature space {name!r}; expected one of {', '.join(FEATURE_SPACES)}")


@dataclass
class Reference:
    """Statistics of the real images generated ones are compared with."""

    name: str  # what the images were, e.g. "digits8-test" or a file
    space: str  # feature space
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    features: np.ndarray | None  # (N, D); KID and precision/recall need them
    meta: dict = field(default_factory=dict)

    @property
    def num(self) -> int | None:
        return None if self.features is None else len(self.features)


def reference_from_images(space, images, name: str, progress: bool = False) -> Reference:
    features, _ = space(images, progress=progress)
    mu, sigma = gaussian_statistics(features)
    return Reference(name, space.name, mu, sigma, features, {"num": len(features)})


def save_reference(path: str | os.PathLike, ref: Reference) -> None:
    if ref.features is None:
        raise ValueError(f"{path}: reference {ref.name} has no features to save")
    save_statistics(path, ref.features, space=ref.space, name=ref.name, **{k: v for k, v in ref.meta.items()})


def load_reference(path: str | os.PathLike, space: str) -> Reference:
    """Statistics saved by `save_reference` (or any .npz with mu and sigma); refuses another feature space's."""
    mu, sigma, features, meta = load_statistics(path)
    saved = meta.get("space")
    if saved is not None and saved != space:
        raise ValueError(f"{path}: statistics of the {saved} feature space, but this evaluation uses {space}")
    return Reference(os.fspath(path), space, mu, sigma, features, meta)


DIGITS_NAME = re.compile(r"digits(-rgb)?\d*")  # the built-in digits, as cmfast.data.load_dataset names them


def resolve_split(spec: str | None, split: str | None) -> str:
    """The split to load `spec` (None: the built-in digits) with: the given one, else "test", for the built-in digits;
    "all" for any other dataset, which is one whole set. A dataset path that does not exist is refused here, so that
    this, not the split, is what the user hears; a split given for a user dataset is passed on, for the loader to
    refuse."""
    if spec is None or DIGITS_NAME.fullmatch(spec):
        return split or "test"
    if not os.path.exists(spec):
        raise ValueError(f"{spec}: no such file or folder")
    return "all" if split in (None, "all", "train") else split


def reference_for(space, spec: str | None, split: str, size: int, channels: int, progress: bool = False) -> Reference:
    """`spec`: a statistics .npz, a dataset (as --data takes: digits8, a folder, an image .npz) or None for the built-in
    digits at the generated images' size and channels. `split` divides only the digits."""
    if spec is not None and is_statistics_file(spec):
        return load_reference(spec, space.name)
    if spec is None:
        spec = f"digits{'-rgb' if channels == 3 else ''}{size}"
    data = load_dataset(spec, split=split)
    return reference_from_images(space, data.images, f"{data.name}", progress=progress)


def compute_metrics(
    features: np.ndarray,
    ref: Reference,
    logits: np.ndarray | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    neighborhood: int = 3,
    seed: int = 2020,
) -> dict:
    """FID of `features` (generated, (N, D)) against `ref`; KID and precision/recall when the reference keeps its
    features; the score (IS, 10 splits) from `logits`. KID subsets are capped at the smaller set's size; kid_std is
    None when a subset is a whole set, precision and recall are None when a set has at most `neighborhood` images."""
    isc_features_to_metric = _fidelity("metric_isc").isc_features_to_metric
    kid_features_to_metric = _fidelity("metric_kid").kid_features_to_metric
    prc_features_to_metric = _fidelity("metric_prc").prc_features_to_metric

    mu, sigma = gaussian_statistics(features)
    if mu.shape != ref.mu.shape:
        raise ValueError(f"features have {mu.shape[0]} dimensions, the reference {ref.mu.shape[0]}")
    out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    if ref.features is not None:
        gen = torch.from_numpy(np.asarray(features, np.float32))
        real = torch.from_numpy(np.asarray(ref.features, np.float32))
        size = min(kid_subset_size, len(gen), len(real))
        kid = kid_features_to_metric(
            gen, real, kid_subsets=kid_subsets, kid_subset_size=size, verbose=False, rng_seed=seed
        )
        out["kid"] = kid["kernel_inception_distance_mean"]
        # A subset as large as its whole set is the same every time, so the std would miss that set's sampling spread
        whole = size in (len(gen), len(real))
        out["kid_std"] = None if whole else kid["kernel_inception_distance_std"]
        out["precision"] = out["recall"] = None  # each point needs `neighborhood` neighbours in its own set
        if min(len(gen), len(real)) > neighborhood:
            prc = prc_features_to_metric(gen, real, prc_neighborhood=neighborhood, verbose=False)
            out["precision"], out["recall"] = prc["precision"], prc["recall"]
    if logits is not None:
        score = isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits=min(10, len(logits)), rng_seed=seed)
        out["is"], out["is_std"] = score["inception_score_mean"], score["inception_score_std"]
    return out
