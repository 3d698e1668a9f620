"""Sample-quality metrics on digits, in the feature space of the project's classifier.

FID (Frechet distance of Gaussian fits), precision and recall (k-NN manifolds, Kynkaanniemi
et al. 2019), an Inception-Score analogue (exp E KL(p(y|x) || p(y))) and, for the
class-conditional model, the share of samples classified as the requested class. ``fid``,
``precision_recall`` take any features: with torchmetrics installed, ``inception_features``
gives Inception-v3 features of RGB images for the same code.
"""

import numpy as np
import torch


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D)."""
    from scipy import linalg

    a, b = real.double().numpy(), fake.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # near-singular: regularise as the reference code does
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3):
    """(precision, recall): the share of fake samples inside the real k-NN manifold, and of
    real samples inside the fake one."""

    def inside(ref: torch.Tensor, query: torch.Tensor) -> float:
        d_ref = torch.cdist(ref, ref)
        radii = d_ref.kthvalue(k + 1, dim=1).values  # +1: the zero distance to itself
        return (torch.cdist(query, ref) <= radii[None]).any(dim=1).float().mean().item()

    return inside(real.float(), fake.float()), inside(fake.float(), real.float())


def inception_score(probs: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) from class probabilities (N, C)."""
    p_y = probs.mean(0, keepdim=True)
    kl = (probs * (torch.log(probs.clamp_min(1e-12)) - torch.log(p_y.clamp_min(1e-12)))).sum(1)
    return float(torch.exp(kl.mean()))


@torch.no_grad()
def evaluate(classifier, images: torch.Tensor, reference: torch.Tensor, labels=None) -> dict:
    """All metrics of `images` against `reference` images, in the classifier's features."""
    feats, ref = classifier.features(images), classifier.features(reference)
    probs = torch.softmax(classifier.head(feats), dim=-1)
    precision, recall = precision_recall(ref, feats)
    result = {"fid": fid(ref, feats), "precision": precision, "recall": recall, "is": inception_score(probs)}
    if labels is not None:
        result["class_accuracy"] = (probs.argmax(-1) == labels).float().mean().item()
    return result


def inception_features(images: torch.Tensor) -> torch.Tensor:
    """Inception-v3 pool features (N, 2048) of uint8 RGB images (N, 3, H, W), through
    torchmetrics (weights download once); feed them to fid / precision_recall."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as error:
        raise ImportError("inception_features needs torchmetrics[image]: pip install 'torchmetrics[image]'") from error
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).eval()
    with torch.no_grad():
        return net(images).reshape(images.shape[0], -1)
