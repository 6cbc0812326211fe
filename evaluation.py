"""Sample quality: a small classifier per dataset, Frechet distance on its features, and scores.

There are no Inception weights offline, and Inception features mean little on 28x28 greyscale
digits, so each dataset gets a small CNN (trained once by `python experiment.py train-classifier`,
weights in data/) and FID is measured on its 128-d penultimate layer.

    scores = evaluation.evaluate_samples(images, "mnist")   # fid, fid_floor, confident_share, ...
"""

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import data

DATA_DIR = Path(__file__).resolve().parent / "data"  # figures and small artefacts tracked in git


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                          # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                                          # 7x7
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


def classifier_path(dataset):
    return DATA_DIR / f"classifier_{dataset}.pt"


def train_classifier(dataset, epochs=3, batch_size=128, seed=0, root=None):
    """Train the evaluation classifier on the training split; report test accuracy; save to data/."""
    torch.manual_seed(seed)
    x_train, y_train = data.load_images(dataset, train=True, root=root)
    x_test, y_test = data.load_images(dataset, train=False, root=root)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    steps = epochs * (len(x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x_train))
        for i in range(len(x_train) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x_train[idx].float() / 255), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"classifier {dataset}: epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        acc = (model(x_test.float() / 255).argmax(1) == y_test).float().mean().item()
    DATA_DIR.mkdir(exist_ok=True)
    data.atomic_torch_save(model.state_dict(), classifier_path(dataset))
    info = dict(dataset=dataset, test_accuracy=round(acc, 4), epochs=epochs, batch_size=batch_size, seed=seed,
                params=sum(p.numel() for p in model.parameters()))
    data.atomic_write_text(DATA_DIR / f"classifier_{dataset}.json", json.dumps(info, indent=2) + "\n")
    print(f"classifier {dataset}: test accuracy {acc:.4f}, saved to {classifier_path(dataset)}")
    return model, acc


def gaussian_stats(features):
    return features.mean(0), torch.cov(features.T)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    Tr (S1 S2)^(1/2) = sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), a symmetric
    PSD matrix, so a symmetric eigendecomposition suffices.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    sqrt1 = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


class Evaluator:
    """One dataset's yardstick: its classifier, the feature statistics of its training split, and
    FID floors per sample count. Built lazily and once per process (see `evaluator`)."""

    def __init__(self, dataset):
        self.dataset = dataset
        path = classifier_path(dataset)
        if not path.exists():
            raise FileNotFoundError(f"no evaluation classifier at {path}: run `python experiment.py "
                                    f"train-classifier --dataset {dataset}`")
        model = Classifier()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        # on a GPU when there is one: scoring the 60,000 training images takes a minute on a CPU
        self.classifier = model.eval().to("cuda" if torch.cuda.is_available() else "cpu")
        self._reference, self._floors, self._real_spread = None, {}, None

    @torch.no_grad()
    def outputs(self, images, batch=1000):
        """(features (N, 128) float64, class probabilities (N, 10)) on the CPU, of images in [0, 1] or uint8."""
        device = next(self.classifier.parameters()).device
        feats, probs = [], []
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            f = self.classifier.features(x)
            feats.append(f.double().cpu())
            probs.append(self.classifier.head(f).softmax(-1).cpu())
        return torch.cat(feats), torch.cat(probs)

    @property
    def reference(self):
        """Feature statistics of the whole training split: the reference every FID is measured against."""
        if self._reference is None:
            self._reference = gaussian_stats(self.outputs(data.load_images(self.dataset, train=True)[0])[0])
        return self._reference

    def fid(self, images):
        """(FID against the training split, class probabilities) of images."""
        feats, probs = self.outputs(images)
        return self.fid_of_features(feats), probs

    def fid_of_features(self, feats):
        return frechet_distance(*gaussian_stats(feats), *self.reference)

    def floor(self, n):
        """FID of n random real test images against the training split, at the same count as a
        sample set: what a perfect sampler would score, up to the luck of the draw (memorising
        models can go below it)."""
        return self._real(n)[0]

    def real_confident_share(self, n, confidence=0.9):
        """The share of the floor's n real test images that the classifier labels with at least
        `confidence`: the most a sample set can honestly reach, since the classifier is unsure of
        some real images too."""
        return (self._real(n)[1] >= confidence).float().mean().item()

    def _real(self, n):
        """(FID, top class probabilities) of n random real test images (the same draw every time)."""
        if n not in self._floors:
            test = data.load_images(self.dataset, train=False)[0]
            idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
            fid, probs = self.fid(test[idx])
            self._floors[n] = (fid, probs.max(1).values)
        return self._floors[n]

    @staticmethod
    def spread(features):
        """Diversity of a set of images: the mean squared distance of their features from their mean
        (the trace of the feature covariance)."""
        return (features - features.mean(0)).pow(2).sum(1).mean().item()

    def real_spread(self):
        """`spread` of the real test images of each class."""
        if self._real_spread is None:
            test, labels = data.load_images(self.dataset, train=False)
            feats = self.outputs(test)[0]
            self._real_spread = [self.spread(feats[labels == c]) for c in range(10)]
        return self._real_spread

    def evaluate(self, images, confidence=0.9, labels=None):
        """FID (with its floor at the same count), confident share and class histogram of images in [0, 1].

        With `labels`, the classes the images were asked to show (a conditional model), also the share
        classified as the requested class, and the per-class diversity: the feature spread of the samples
        of each requested class over that of the real test images of the class, averaged over the
        classes (1 = as varied as the real images; guidance lowers it)."""
        n = len(images)
        feats, probs = self.outputs(images)
        fid = self.fid_of_features(feats)
        conf, pred = probs.max(1)
        hist = torch.bincount(pred, minlength=10).tolist()
        n_real = min(n, 10000)  # the floor's real images: as many as the samples, at most the test split
        floor = self.floor(n_real)
        result = dict(dataset=self.dataset, n_samples=n, fid=round(fid, 3), fid_floor=round(floor, 3),
                      fid_over_floor=round(fid / floor, 2),
                      confident_share=round((conf >= confidence).float().mean().item(), 4),
                      real_confident_share=round(self.real_confident_share(n_real, confidence), 4),
                      class_histogram=hist, class_share_min=round(min(hist) / n, 4),
                      class_share_max=round(max(hist) / n, 4))
        if labels is not None:
            labels = torch.as_tensor(labels).cpu()
            classes = [c for c in range(10) if int((labels == c).sum()) >= 2]
            ratios = [self.spread(feats[labels == c]) / self.real_spread()[c] for c in classes]
            result.update(requested_class_share=round((pred == labels).float().mean().item(), 4),
                          class_diversity=round(sum(ratios) / len(ratios), 4) if ratios else None)
        return result


@functools.lru_cache(maxsize=None)
def evaluator(dataset):
    """The dataset's Evaluator, built on first use and then shared (its statistics cost a minute)."""
    return Evaluator(dataset)


def evaluate_samples(images, dataset, confidence=0.9, labels=None):
    """FID (with its floor at the same count), confident share and class histogram of samples in [0, 1];
    with `labels` (requested classes) also the share classified as requested and the per-class diversity."""
    return evaluator(dataset).evaluate(images, confidence, labels)


# ================================================================================================
# Your own images: no classifier, so check for memorisation instead
# ================================================================================================

NEAR_COPY_RMS = 0.05  # a sample this close (RMS pixel distance, pixels in [0, 1]) to a training image is a near-copy


def nearest_training_images(images, train_u8, exclude=None, chunk=4096):
    """For each image (in [0, 1]): the RMS pixel distance to its nearest training image (uint8) and
    that image's index; `exclude` (one training index per image) leaves an image's own copy out."""
    x = images.flatten(1).float().cpu()
    best = torch.full((len(x),), float("inf"))
    index = torch.zeros(len(x), dtype=torch.long)
    for start in range(0, len(train_u8), chunk):
        d2 = torch.cdist(x, train_u8[start:start + chunk].flatten(1).float() / 255).pow(2)
        if exclude is not None:
            own = exclude - start
            inside = (own >= 0) & (own < d2.shape[1])
            d2[inside.nonzero().flatten(), own[inside]] = float("inf")
        value, where = d2.min(1)
        better = value < best
        best[better], index[better] = value[better], where[better] + start
    return (best / x.shape[1]).sqrt(), index


def memorisation(images, train_u8, threshold=NEAR_COPY_RMS, reference=500):
    """How close samples come to copying their training set: each sample's RMS pixel distance to its
    nearest training image, the share of near-copies (below `threshold`), and for scale the same
    distance from `reference` training images to their nearest *other* training image."""
    dist, index = nearest_training_images(images, train_u8)
    pick = torch.randperm(len(train_u8), generator=torch.Generator().manual_seed(0))[:reference]
    real, _ = nearest_training_images(train_u8[pick].float() / 255, train_u8, exclude=pick)
    result = dict(n_samples=len(images), near_copy_rms=threshold,
                  near_copy_share=round((dist < threshold).float().mean().item(), 4),
                  nearest_rms_median=round(dist.median().item(), 4),
                  train_nearest_rms_median=round(real.median().item(), 4))
    return result, dist, index


def fid_floor(dataset, n):
    return evaluator(dataset).floor(n)
