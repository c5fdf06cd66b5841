"""The forward pass: uint8 pixels -> standardised tensors on the device -> embeddings.

:class:`BatchEmbedder` serves both engines; :class:`QueryEmbedder` embeds query images
exactly as a recorded dataset was made (same backbone, weights, preprocessing, precision).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

import numpy as np
import torch

from ..backbones import Embedder, load_backbone
from ..backbones.stages import stage_embedder
from ..config import DEFAULT_MAX_PIXELS, ExtractConfig, Layer, Precision
from ..errors import MetadataMismatchError, ProvenanceError
from ..images.decode import Decoded, DecodeFailure, EncodedJPEG, decode_file
from ..images.preprocess import Preprocessing
from ..provenance import Provenance, WeightsKind
from .layers import ConcatStages
from .plan import Runtime, plan

log = logging.getLogger(__name__)


def standardize(
    x: torch.Tensor,
    preprocessing: Preprocessing,
    *,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32 on the same device, normalised.

    The arithmetic of torchvision's ``ImageClassification`` (``x / 255``, then
    ``(x - mean) / std``), done once per batch on the device rather than per image.
    """
    mean = torch.tensor(preprocessing.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, device=x.device).view(1, -1, 1, 1)
    x = x.float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=memory_format)


_CPU = torch.device("cpu")


def pixels_to_tensor(
    pixels: np.ndarray,
    preprocessing: Preprocessing,
    *,
    device: torch.device = _CPU,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """(B, H, W, C) uint8 numpy -> (B, C, H, W) normalised float32 on ``device``."""
    x = torch.from_numpy(pixels)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    # (B, H, W, C) -> (B, C, H, W): the strides are channels_last already
    return standardize(x.permute(0, 3, 1, 2), preprocessing, memory_format=memory_format)


class BatchEmbedder:
    """uint8 pixels (B, H, W, C) -> embeddings (B, D) float32 numpy.

    Standardises on the device (:func:`pixels_to_tensor`), then runs the backbone under
    ``inference_mode`` and, for bf16/fp16, autocast.
    """

    def __init__(self, embedder: Embedder, runtime: Runtime, *, l2_normalize: bool = False) -> None:
        self.device = torch.device(runtime.device)
        self.runtime = runtime
        self.l2_normalize = l2_normalize
        self.memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
        self.model = embedder.to(self.device, memory_format=self.memory_format)
        self.preprocessing = embedder.preprocessing
        self.autocast_dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(
            runtime.precision
        )
        #: the largest batch the device has run; halved on out-of-memory (see :meth:`embed`)
        self.max_batch = runtime.batch_size

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, C) uint8 -> (B, D) float32."""
        x = pixels_to_tensor(
            pixels, self.preprocessing, device=self.device, memory_format=self.memory_format
        )
        return self.embed(x)

    def embed_items(
        self, items: list[Decoded | EncodedJPEG]
    ) -> tuple[np.ndarray, dict[int, DecodeFailure]]:
        """Worker results -> (embeddings of the items that decoded, failures by index).

        Encoded JPEGs (``--decode device``) are decoded here, on the device.
        """
        if all(isinstance(d, Decoded) for d in items):
            return self(np.stack([d.pixels for d in items])), {}
        from .device_decode import decode_items

        x, failures = decode_items(items, self.preprocessing, self.device)
        if not len(x):
            return np.empty((0, self.model.dim), np.float32), failures
        return self.embed(standardize(x, self.preprocessing, memory_format=self.memory_format)), failures

    def embed(self, x: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) normalised float on the device -> (B, D) float32 numpy.

        A batch the device has no memory for is halved and both halves run, and later
        batches are split to the size that fitted: the job finds the largest batch the
        GPU holds and never loses one.
        """
        if len(x) > self.max_batch:
            return np.concatenate([self.embed(part) for part in x.split(self.max_batch)])
        try:
            return self._forward(x)
        except torch.cuda.OutOfMemoryError:
            if len(x) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.max_batch = len(x) // 2
            log.warning("out of device memory at batch %d; continuing at %d", len(x), self.max_batch)
            return self.embed(x)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> np.ndarray:
        with torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        ):
            emb = self.model(x)
        emb = emb.float()
        if self.l2_normalize:
            emb = torch.nn.functional.normalize(emb, dim=1)
        return emb.cpu().numpy()


def _check_same_model(recorded: Provenance, loaded: Provenance) -> None:
    """Refuse to embed queries with other weights than the dataset's: a checkpoint
    replaced at the same path (another sha256), a timm ``DEFAULT`` that now names another
    pretrained tag, another layer or preprocessing. Raises :class:`MetadataMismatchError`
    listing each difference."""
    loaded = dataclasses.replace(loaded, normalize=recorded.normalize)
    found = recorded.differences(loaded, keys="space", names=("the embeddings", "loaded now"))
    if found:
        raise MetadataMismatchError(
            "the query model is not the one that made these embeddings: " + "; ".join(found)
            + ". Queries embedded with other weights would be compared with vectors from "
            "another space; restore the recorded weights or re-extract and rebuild the index"
        )


class QueryEmbedder:
    """Embeds image files exactly as the dataset described by ``meta`` was made.

    For queries against an index: the same backbone, weights, layer, preprocessing,
    precision and normalisation, loaded once (a service embeds many queries with one).
    Calling it with paths returns ``(vectors (n, D) float32, failures)`` where
    ``failures[i]`` is ``None`` for images that were embedded; rows of failed images are
    NaN. Calls are serialised: one forward pass at a time uses every core already.
    """

    def __init__(self, meta: dict, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        provenance = Provenance.from_json(meta)
        if not provenance.known:
            raise ProvenanceError(
                "these embeddings carry no embedpipe provenance (another tool wrote them), so "
                "there is no backbone to embed query images with; query with vectors instead"
            )
        weights = provenance.weights
        key_map = weights.key_map if weights.kind == WeightsKind.CHECKPOINT else None
        if provenance.layer in Layer.values():
            embedder = load_backbone(
                provenance.backbone, weights=weights.argument(), layer=provenance.layer,
                preprocessing=provenance.preprocessing, seed=weights.seed or 0, key_map=key_map,
            )
            loaded = embedder.provenance()
        else:  # one stage of an `extract --layer stages` run
            embedder = ConcatStages(stage_embedder(
                provenance.backbone, weights=weights.argument(), seed=weights.seed or 0,
                layers=(provenance.layer,), key_map=key_map, input_size=provenance.preprocessing.crop_size,
            ))
            embedder.preprocessing = provenance.preprocessing
            loaded = dataclasses.replace(embedder.provenance(), layer=provenance.layer)
        _check_same_model(provenance, loaded)
        # the settings that shape the vectors; the device, batch and workers are this machine's
        config = ExtractConfig(
            source=".", out=".", backbone=provenance.backbone, precision=provenance.precision,
            decode=provenance.decode, normalize=bool(provenance.normalize), max_pixels=max_pixels,
        )
        self.config = config
        self.preprocessing = embedder.preprocessing
        self.dim = embedder.dim
        self.forward = BatchEmbedder(embedder, plan(config), l2_normalize=config.normalize)
        self._lock = threading.Lock()

    def __call__(self, paths: list[str | os.PathLike]) -> tuple[np.ndarray, list[DecodeFailure | None]]:
        results = [
            decode_file(str(p), self.preprocessing, max_pixels=self.config.max_pixels, mode=self.config.decode)
            for p in paths
        ]
        vectors = np.full((len(paths), self.dim), np.nan, np.float32)
        failures = {i: r for i, r in enumerate(results) if isinstance(r, DecodeFailure)}
        ok = [i for i in range(len(results)) if i not in failures]
        if ok:
            with self._lock:
                emb, rejected = self.forward.embed_items([results[i] for i in ok])
            vectors[[i for j, i in enumerate(ok) if j not in rejected]] = emb
            failures.update({ok[j]: f for j, f in rejected.items()})
        return vectors, [failures.get(i) for i in range(len(paths))]


def embed_paths(paths: list[str | os.PathLike], meta: dict) -> tuple[np.ndarray, list[DecodeFailure | None]]:
    """Embed image files exactly as the dataset described by ``meta`` was made (a
    one-off :class:`QueryEmbedder`)."""
    return QueryEmbedder(meta)(paths)
