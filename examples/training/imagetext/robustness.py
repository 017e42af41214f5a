"""The paper's robustness analyses for the image-text models.

* Missing modality (the paper's Table 5): one modality of every test pair is replaced by
  Gaussian noise with the training set's mean and variance, and the fusion head's accuracy is
  measured. Images are replaced in pixel space (the normalised (3, H, W) input) with the
  per-channel mean and variance of the training images; texts are replaced in the text
  encoder's input space (its word embeddings, the same place the paper's text mixup acts)
  with the per-dimension mean and variance of the training tokens' embeddings, keeping each
  text's length and attention mask.
* Confidence on random inputs (its Figure 5): both modalities are replaced by such noise and
  the mean max-softmax probability of the fusion head is reported, beside the same figure on
  the clean test pairs. A calibrated model should be far less confident on noise.

The statistics are estimated on up to ``max_samples`` training pairs (the model's current
word embeddings are used for the text, so they are computed after training).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
from sklearn.metrics import accuracy_score
from torch import Tensor
from training.data import move_to


__all__ = ["NoiseStats", "noise_statistics", "robustness_report", "CORRUPTIBLE"]

CORRUPTIBLE = ("image", "text")


@dataclass
class NoiseStats:
    """Per-channel pixel and per-dimension token-embedding mean and std of the training set."""

    image_mean: Tensor
    image_std: Tensor
    text_mean: Tensor
    text_std: Tensor
    samples: int

    def noise(self, modality: str, inputs: Sequence, model, generator: torch.Generator) -> Tensor:
        """Gaussian noise shaped like ``modality``'s input in the batch ``inputs`` (drawn on the CPU)."""
        pixels, tokens = inputs
        if modality == "image":
            shape, device, dtype = pixels.shape, pixels.device, pixels.dtype
            mean, std = self.image_mean.view(1, 3, 1, 1), self.image_std.view(1, 3, 1, 1)
        elif modality == "text":
            ids = tokens["input_ids"]
            shape, device = (*ids.shape, self.text_mean.numel()), ids.device
            dtype = model.text_encoder.model.get_input_embeddings().weight.dtype
            mean, std = self.text_mean, self.text_std
        else:
            raise ValueError(f"modality must be one of {CORRUPTIBLE}; got {modality!r}")
        sample = torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean
        return sample.to(device=device, dtype=dtype)


@torch.no_grad()
def noise_statistics(model, batches: Iterable, *, device, max_samples: int = 2048) -> NoiseStats:
    """Mean and std of the training pixels (per channel) and word embeddings of real tokens (per dimension)."""
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1; got {max_samples}")
    was_training = model.training
    model.eval()
    pix_sum = pix_sq = torch.zeros(3, dtype=torch.float64)
    tok_sum = tok_sq = 0
    pix_count = tok_count = seen = 0
    for (pixels, tokens), labels in batches:
        take = min(len(labels), max_samples - seen)
        pixels = pixels[:take].to(torch.float64)
        pix_sum = pix_sum + pixels.sum(dim=(0, 2, 3))
        pix_sq = pix_sq + (pixels**2).sum(dim=(0, 2, 3))
        pix_count += pixels.numel() // 3
        ids = tokens["input_ids"][:take].to(device)
        mask = tokens["attention_mask"][:take].to(device).bool() if "attention_mask" in tokens else torch.ones_like(ids, dtype=torch.bool)
        embeds = model.text_encoder.embed_tokens(ids)[mask].to(torch.float64).cpu()
        tok_sum = tok_sum + embeds.sum(0)
        tok_sq = tok_sq + (embeds**2).sum(0)
        tok_count += embeds.shape[0]
        seen += take
        if seen >= max_samples:
            break
    model.train(was_training)
    if seen == 0:
        raise ValueError("noise_statistics: the training batches are empty")

    def moments(total, squares, count):
        mean = total / count
        return mean.float(), (squares / count - mean**2).clamp_min(0).sqrt().float()

    image_mean, image_std = moments(pix_sum, pix_sq, pix_count)
    text_mean, text_std = moments(tok_sum, tok_sq, tok_count)
    return NoiseStats(image_mean, image_std, text_mean, text_std, seen)


@torch.no_grad()
def _predict(model, batches, *, device, replace: Sequence[str], stats: Optional[NoiseStats], seed: int, autocast: Callable):
    generator = torch.Generator().manual_seed(seed)
    labels, probabilities = [], []
    for inputs, y in batches:
        inputs = move_to(inputs, device)
        substitutes = {m: stats.noise(m, inputs, model, generator) for m in replace}
        with autocast():
            logits = model.classify(model.encode_replaced(inputs, substitutes), unimodal=False)[1]
        probabilities.append(torch.softmax(logits.float(), dim=1).cpu())
        labels.append(y)
    return torch.cat(labels).numpy(), torch.cat(probabilities).numpy()


def robustness_report(
    model,
    batches: Iterable,
    stats: NoiseStats,
    *,
    device,
    corrupt: Sequence[str] = CORRUPTIBLE,
    confidence: bool = True,
    seed: int = 0,
    autocast: Callable = contextlib.nullcontext,
) -> Dict[str, float]:
    """Test accuracy with each modality in ``corrupt`` replaced by noise, and mean max-softmax confidences.

    Keys: ``acc_clean``, ``acc_<modality>_noise`` for each corrupted modality and, with
    ``confidence``, ``confidence_clean`` (test pairs) and ``confidence_random`` (both modalities
    noise). Values are fractions in [0, 1]. ``batches`` yields ``([pixels, tokens], labels)``
    and is iterated once per evaluation.
    """
    for modality in corrupt:
        if modality not in CORRUPTIBLE:
            raise ValueError(f"corrupt (--eval-corrupt) must name modalities from {CORRUPTIBLE}; got {modality!r}")
    was_training = model.training
    model.eval()
    options = dict(device=device, stats=stats, seed=seed, autocast=autocast)
    y, p = _predict(model, batches, replace=(), **options)
    report = {"acc_clean": float(accuracy_score(y, p.argmax(1)))}
    for modality in corrupt:
        y_c, p_c = _predict(model, batches, replace=(modality,), **options)
        report[f"acc_{modality}_noise"] = float(accuracy_score(y_c, p_c.argmax(1)))
    if confidence:
        report["confidence_clean"] = float(p.max(1).mean())
        _, p_r = _predict(model, batches, replace=CORRUPTIBLE, **options)
        report["confidence_random"] = float(p_r.max(1).mean())
    model.train(was_training)
    return report
