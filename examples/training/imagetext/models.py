"""Encoders and heads for the image-text reproductions.

* :class:`TextEncoder`: a Hugging Face BERT or RoBERTa (any ``AutoModel`` text encoder works),
  loaded with ``from_pretrained`` from a model id or a local folder; the embedding is the first
  token of the last hidden state (``[CLS]`` / ``<s>``), as in the released code. It can also
  run on given token embeddings (``inputs_embeds``): that is where the paper's text mixup and
  the text-noise evaluation enter.
* :class:`ImageEncoder`: a Hugging Face ViT (first token) or, with ``backend="timm"``, a timm
  model (its pooled features); the matching :class:`~training.imagetext.data.ImageTransform` comes with it.
* :func:`mlp_head`: the released 3-layer classifier ``Linear-ReLU-Dropout-Linear-ReLU-Linear``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Mapping, Sequence, Tuple

import torch
from torch import Tensor, nn

from training.imagetext.data import ImageTransform
from training.model import MultimodalClassifier, xavier_normal_init

__all__ = [
    "TextEncoder",
    "ImageEncoder",
    "ImageTextClassifier",
    "mlp_head",
    "mixed_attention_mask",
    "load_tokenizer",
    "require_timm",
    "TIMM_MISSING",
]

TIMM_MISSING = (
    "--image-backend timm needs the 'timm' package, which could not be imported ({error}). "
    "Install it with `pip install timm` (it needs torchvision built for your torch), or use the "
    "default --image-backend transformers."
)


class EncoderLoadError(OSError):
    """A pretrained encoder or tokenizer that cannot be loaded; the message names the option."""


def _quiet_transformers():
    import transformers

    # Loading a checkpoint without its unused pooler logs a long notice; what matters, weights
    # that the checkpoint lacks, is checked by _from_pretrained instead.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _from_pretrained(model_class, name_or_path: str, option: str, **kwargs):
    """``model_class.from_pretrained`` that warns when weights are missing from the checkpoint
    (they would start random, which no reproduction wants to happen silently)."""
    model, info = model_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or []) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        warnings.warn(f"{option} {name_or_path}: {len(missing)} weights are not in the checkpoint and start random ({shown})", RuntimeWarning, stacklevel=3)
    return model


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained``; the error names the model id or folder."""
    transformers = _quiet_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise EncoderLoadError(f"cannot load a tokenizer from {name_or_path!r} (--text-encoder): {err}") from err


class TextEncoder(nn.Module):
    """First-token embedding of a pretrained text transformer.

    BERT and RoBERTa are built without their pooler (the released code never used it, and
    unused parameters break ``DistributedDataParallel``).
    """

    def __init__(self, name_or_path: str) -> None:
        super().__init__()
        transformers = _quiet_transformers()
        try:
            config = transformers.AutoConfig.from_pretrained(name_or_path)
            classes = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel}
            if config.model_type in classes:
                self.model = _from_pretrained(classes[config.model_type], name_or_path, "--text-encoder", add_pooling_layer=False)
            else:
                self.model = _from_pretrained(transformers.AutoModel, name_or_path, "--text-encoder")
        except (OSError, ValueError) as err:
            raise EncoderLoadError(f"cannot load a text encoder from {name_or_path!r} (--text-encoder): {err}") from err
        self.name = name_or_path
        self.out_dim = int(self.model.config.hidden_size)

    @property
    def max_positions(self) -> int:
        """Longest sequence the position embeddings allow (RoBERTa reserves 2 for its padding offset)."""
        limit = int(getattr(self.model.config, "max_position_embeddings", 512))
        return limit - 2 if self.model.config.model_type == "roberta" else limit

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Word embeddings (N, L, D) of the ids, before position embeddings and LayerNorm."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, tokens: Mapping[str, Tensor]) -> Tensor:
        """First-token embedding (N, D) of a tokenizer's output (``input_ids``, ``attention_mask``,
        optionally ``token_type_ids``), or of ``inputs_embeds`` (N, L, D) given instead of the ids."""
        kwargs = {k: tokens[k] for k in ("attention_mask", "token_type_ids") if k in tokens}
        if "inputs_embeds" in tokens:
            kwargs["inputs_embeds"] = tokens["inputs_embeds"]
        else:
            kwargs["input_ids"] = tokens["input_ids"]
        return self.model(**kwargs).last_hidden_state[:, 0]


def require_timm():
    """Import timm or raise an ImportError that says what to do."""
    try:
        import timm
    except Exception as err:  # timm fails with ImportError, or RuntimeError on a mismatched torchvision
        raise ImportError(TIMM_MISSING.format(error=f"{type(err).__name__}: {err}")) from err
    return timm


class ImageEncoder(nn.Module):
    """Image embedding: first token of a Hugging Face ViT, or a timm model's pooled features.

    ``transform(horizontal_flip=...)`` gives the preprocessing that matches the model: the
    size, mean and std of its saved image processor (ViT) or data config (timm). With timm,
    ``name_or_path`` is anything ``timm.create_model`` takes (a model name, ``hf-hub:...``,
    ``local-dir:...``); ``pretrained=False`` (timm only) gives random weights.
    """

    def __init__(self, name_or_path: str, *, backend: str = "transformers", pretrained: bool = True) -> None:
        super().__init__()
        if backend not in ("transformers", "timm"):
            raise ValueError(f"backend (--image-backend) must be 'transformers' or 'timm'; got {backend!r}")
        self.backend = backend
        self.name = name_or_path
        if backend == "timm":
            timm = require_timm()
            try:
                self.model = timm.create_model(name_or_path, pretrained=pretrained, num_classes=0)
            except Exception as err:
                raise EncoderLoadError(f"cannot create timm model {name_or_path!r} (--image-encoder): {err}") from err
            self.out_dim = int(self.model.num_features)
            data_config = timm.data.resolve_data_config({}, model=self.model)
            _, height, width = data_config["input_size"]
            interpolation = data_config.get("interpolation", "bilinear")
            self._preprocess = ((int(height), int(width)), tuple(data_config["mean"]), tuple(data_config["std"]), interpolation)
            return
        transformers = _quiet_transformers()
        try:
            config = transformers.AutoConfig.from_pretrained(name_or_path)
            if config.model_type == "vit":
                self.model = _from_pretrained(transformers.ViTModel, name_or_path, "--image-encoder", add_pooling_layer=False)
            else:
                self.model = _from_pretrained(transformers.AutoModel, name_or_path, "--image-encoder")
        except (OSError, ValueError) as err:
            raise EncoderLoadError(f"cannot load an image encoder from {name_or_path!r} (--image-encoder): {err}") from err
        self.out_dim = int(self.model.config.hidden_size)
        self._preprocess = vit_preprocessing(name_or_path, self.model.config)

    def transform(self, *, horizontal_flip: bool = False) -> ImageTransform:
        size, mean, std, resample = self._preprocess
        if resample not in _PIL_NAMES.values():  # e.g. timm's "random"
            resample = "bilinear"
        return ImageTransform(size, mean, std, resample=resample, horizontal_flip=horizontal_flip)

    def forward(self, pixel_values: Tensor) -> Tensor:
        if self.backend == "timm":
            return self.model(pixel_values)
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


_PIL_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def vit_preprocessing(name_or_path: str, config) -> Tuple[Tuple[int, int], tuple, tuple, str]:
    """Size, mean, std and resampling of the model's saved image processor (ViT defaults without one)."""
    transformers = _quiet_transformers()
    size = (int(config.image_size), int(config.image_size))
    mean, std, resample = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear"
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        logging.getLogger(__name__).warning("no image processor saved with %s; resizing to %s with mean/std 0.5", name_or_path, size)
        return size, mean, std, resample
    proc_size = getattr(processor, "size", None) or {}
    if "height" in proc_size and "width" in proc_size:
        size = (int(proc_size["height"]), int(proc_size["width"]))
    mean = tuple(getattr(processor, "image_mean", None) or mean)
    std = tuple(getattr(processor, "image_std", None) or std)
    raw = getattr(processor, "resample", None)
    resample = _PIL_NAMES.get(int(raw), "bilinear") if raw is not None else resample
    return size, mean, std, resample


def mlp_head(in_dim: int, hidden: int, num_classes: int, *, dropout: float = 0.0) -> nn.Sequential:
    """``Linear(in, hidden)-ReLU-Dropout-Linear(hidden, hidden)-ReLU-Linear(hidden, classes)``, Xavier-normal init.

    The released configuration sets the dropout to 0 for both datasets.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
    head = nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    head.apply(xavier_normal_init)
    return head




def mixed_attention_mask(mask: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """Attention mask of mixed token sequences: a position is real if either source is real there.

    Rows that are not mixed (lam = 1) keep their own mask.
    """
    return torch.where((lam < 1).unsqueeze(1), torch.maximum(mask, mask[perm]), mask)


class ImageTextClassifier(MultimodalClassifier):
    """The engine's model (encoder + head per modality, fusion head) for an image and a text.

    Modality 0 is the image (inputs: normalised pixels), modality 1 the text (inputs: the
    tokenizer's dict). For the paper's M3Co and for vanilla mixup the text is mixed at its word
    embeddings (see :meth:`mix_input`).
    """

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, num_classes: int, *, hidden: int = 256, dropout: float = 0.0) -> None:
        heads = [mlp_head(e.out_dim, hidden, num_classes, dropout=dropout) for e in (image_encoder, text_encoder)]
        fusion = mlp_head(image_encoder.out_dim + text_encoder.out_dim, hidden, num_classes, dropout=dropout)
        super().__init__([image_encoder, text_encoder], heads, fusion)

    @property
    def image_encoder(self) -> ImageEncoder:
        return self.encoders[0]

    @property
    def text_encoder(self) -> TextEncoder:
        return self.encoders[1]

    def mix_input(self, m: int, x, plan):
        """Pixels are mixed as they are; a text is mixed at its word embeddings.

        The word embeddings are the text encoder's input before it adds position and token-type
        embeddings and applies its embedding LayerNorm. The two texts of a pair share the
        positions, so the mixture gets the same position signal as a clean text and still goes
        through the LayerNorm the pretrained weights expect; mixing the embedding layer's
        normalised output instead would skip that LayerNorm for mixtures only. Where one text
        is longer, its extra tokens are mixed with the other's padding and attended to.
        """
        if m == 0:
            return plan.mix(x, 0)
        embeds = plan.mix(self.text_encoder.embed_tokens(x["input_ids"]), 1)
        mixed = {k: v for k, v in x.items() if k != "input_ids"}
        mixed["inputs_embeds"] = embeds
        if "attention_mask" in x:
            perm, lam = plan.perms[1].to(embeds.device), plan.lam[1].to(embeds.device)
            mixed["attention_mask"] = mixed_attention_mask(x["attention_mask"], perm, lam)
        return mixed

    def encode_replaced(self, inputs: Sequence, replace: Mapping[str, Tensor]) -> list:
        """Embeddings with modality inputs replaced: ``replace["image"]`` pixels (N, 3, H, W),
        ``replace["text"]`` word embeddings (N, L, D) used with the text's own attention mask."""
        pixels, tokens = inputs
        if "image" in replace:
            pixels = replace["image"]
        if "text" in replace:
            tokens = {k: v for k, v in tokens.items() if k != "input_ids"}
            tokens["inputs_embeds"] = replace["text"]
        return self.encode([pixels, tokens])
