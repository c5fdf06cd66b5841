"""One frozen configuration object per job, and the string choices they use.

The CLI and pipeline files build these once and pass them down whole; nothing here does
I/O. Every string choice is an Enum so that click, the pipeline reader and the code that
branches on it share one definition.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import FinetuneError
from .uris import is_uri


class Choice(str, enum.Enum):
    """A string-valued Enum whose members compare equal to their values."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


class Layer(Choice):
    """Which activation becomes the embedding."""

    GAP = "gap"  # global average pool of the last convolutional feature map
    PENULTIMATE = "penultimate"  # the input of the final classifier layer


class Device(Choice):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(Choice):
    """Arithmetic of the forward pass (autocast); fp32 reproduces torchvision exactly."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class EmbeddingDtype(Choice):
    """How embeddings are stored on disk."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"


class DecodeMode(Choice):
    """How JPEGs are decoded.

    ``full`` (the default) decodes every pixel, then resizes: exactly what torchvision's
    preset computes. ``draft`` lets libjpeg downscale by 1/2, 1/4 or 1/8 in the DCT domain
    when the image is at least that much larger than the resize target: faster on large
    photos, not exact (docs/guide.md gives its measured cosine to the exact embedding).
    ``device`` decodes JPEGs in batches on the extraction device with
    ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA) and resizes them there, leaving the
    workers only reading and checking files. Other formats are decoded fully by the
    workers in every mode.
    """

    DRAFT = "draft"
    FULL = "full"
    DEVICE = "device"


class Engine(Choice):
    """What schedules an extraction: this process and its decode workers, or Ray Data."""

    LOCAL = "local"
    RAY = "ray"


class IdAlignment(Choice):
    """What to do when backbones' embeddings do not cover the same ids."""

    STRICT = "strict"  # refuse: a comparison on different images is not paired
    INTERSECT = "intersect"  # probe the ids every dataset has; count what is dropped


# --- fine-tuning ---------------------------------------------------------------------


class Mode(Choice):
    HEAD = "head"
    PARTIAL = "partial"
    FULL = "full"


class Augment(Choice):
    NONE = "none"
    STANDARD = "standard"  # random-resized crop + horizontal flip
    STRONG = "strong"  # + colour jitter + TrivialAugment


class Optimizer(Choice):
    SGD = "sgd"
    ADAMW = "adamw"


class Schedule(Choice):
    COSINE = "cosine"
    STEP = "step"


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning job. ``unfreeze`` of ``()`` means the family's last stage."""

    source: Path
    out: Path
    backbone: str
    weights: str = "DEFAULT"
    mode: Mode = Mode.PARTIAL
    epochs: int = 10
    lr: float = 0.01
    backbone_lr_mult: float = 0.1
    unfreeze: tuple[str, ...] = ()
    augment: Augment = Augment.STANDARD
    batch_size: int = 64
    seed: int = 0
    optimizer: Optimizer = Optimizer.SGD
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Schedule = Schedule.COSINE
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    test_size: float = 0.2
    val_size: float = 0.1
    early_stopping: int | None = None
    workers: int = 0
    device: Device = Device.AUTO
    resize_size: int | None = None
    crop_size: int | None = None

    def __post_init__(self) -> None:
        for name, kind in (("source", Path), ("out", Path), ("mode", Mode), ("augment", Augment),
                           ("optimizer", Optimizer), ("schedule", Schedule), ("device", Device)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "unfreeze", tuple(self.unfreeze))
        if self.epochs < 1 or self.batch_size < 1:
            raise FinetuneError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not 0 < self.test_size < 1 or not 0 < self.val_size < 1:
            raise FinetuneError(f"test_size and val_size must lie in (0, 1), got {self.test_size}, {self.val_size}")

    def hparams(self) -> dict:
        """The settings that shape the result (what resume and provenance compare)."""
        d = dataclasses.asdict(self)
        for k in ("source", "out", "workers", "device", "epochs", "early_stopping"):
            d.pop(k)
        return json.loads(json.dumps(d, default=str))


class MapMethod(Choice):
    """How ``embedpipe map`` reduces embeddings to two dimensions."""

    UMAP = "umap"
    PCA = "pca"
    TSNE = "tsne"


#: Cosine similarity from which two images count as near duplicates (embedpipe dedup's
#: default, and the probe's leakage check). Measured on the planted photo corpus of
#: benchmarks/curation.py --smoke (8 real photos, each also resized to half size,
#: re-encoded at JPEG quality 30, centre-cropped to 90% and brightened 10%;
#: EfficientNet-Lite0 with its real ImageNet weights): versions of one photo had cosine
#: 0.841-0.99 (median 0.945), different photos at most 0.363. At 0.85 pair precision was
#: 1.000 and recall 0.988 (0.90: 1.000 / 0.812): the highest threshold that kept recall
#: near 1, leaving the widest margin for distinct-but-alike images, which that corpus
#: does not hold (the full run adds them).
DUPLICATE_SIMILARITY = 0.85


#: Pillow's own default warning threshold; above it an image is refused before decoding.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class ExtractConfig:
    """Everything one extraction job needs, decided before it starts.

    ``weights`` is ``"none"``, ``"DEFAULT"``, a torchvision weights enum name such as
    ``"IMAGENET1K_V2"``, or the path of a local checkpoint. ``workers`` and
    ``batch_size`` of ``None`` are chosen from the machine (see ``engine.plan``);
    ``part_rows`` of ``None`` from the embedding size (parts of ~128 MiB).
    """

    #: a folder, a manifest, a folder URI such as s3://bucket/images, WebDataset tar shards
    #: ('shards/{00000..00099}.tar', a folder of .tar) or Parquet image tables
    source: Path | str
    out: Path
    backbone: str
    #: Parquet image tables: the column of encoded images (bytes, or the Hugging Face
    #: {"bytes", "path"} struct), and optionally the id and label columns
    image_column: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    weights: str = "DEFAULT"
    weights_key_map: str | None = None
    layer: Layer = Layer.GAP
    #: ("stages",) or module paths: one dataset per stage under ``out`` (see extraction.layers)
    stages: tuple[str, ...] = ()
    device: Device = Device.AUTO
    precision: Precision = Precision.FP32
    batch_size: int | None = None
    workers: int | None = None
    decode: DecodeMode = DecodeMode.FULL
    embedding_dtype: EmbeddingDtype = EmbeddingDtype.FLOAT32
    normalize: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout: float = 60.0
    max_errors: float | None = None
    overwrite: bool = False
    resize_size: int | None = None
    crop_size: int | None = None
    seed: int = 0
    part_rows: int | None = None
    # where the job runs: ``Engine.RAY`` takes the three options below (docs/ray.md)
    engine: Engine = Engine.LOCAL
    ray_address: str | None = None  # None: a Ray instance in this process; "auto": a cluster
    concurrency: int | None = None  # model actors; None: one per GPU, or one on CPUs
    num_gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        # accept plain strings and paths from Python callers; store the Enum / Path
        for name, kind in _COERCE.items():
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "stages", (self.stages,) if isinstance(self.stages, str) else tuple(self.stages))
        if self.stages and self.layer != Layer.GAP:
            raise ValueError(f"layer {self.layer.value!r} and stages {self.stages} both given; choose one")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(
                f"workers must be >= 1, got {self.workers}: decoding always runs in "
                "worker processes so that a crashing decoder costs one image, not the job"
            )
        if self.part_rows is not None and self.part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {self.part_rows}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.decode_timeout <= 0:
            raise ValueError(f"decode_timeout must be > 0 seconds, got {self.decode_timeout}")
        if self.max_errors is not None and self.max_errors < 0:
            raise ValueError(f"max_errors must be >= 0, got {self.max_errors}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_gpus_per_worker < 0:
            raise ValueError(f"num_gpus_per_worker must be >= 0, got {self.num_gpus_per_worker}")
        if self.engine != Engine.RAY:
            ray_only = {
                "ray_address": self.ray_address is not None,
                "concurrency": self.concurrency is not None,
                "num_gpus_per_worker": self.num_gpus_per_worker != 0,
            }
            if given := [k for k, v in ray_only.items() if v]:
                raise ValueError(f"{', '.join(given)} only apply to engine 'ray'")


def _source(value: str | Path) -> str | Path:
    """A URI stays a string (``Path`` would fold its ``//``); anything else is a Path."""
    return value if is_uri(value) else Path(value)


_COERCE = {
    "source": _source,
    "out": Path,
    "layer": Layer,
    "device": Device,
    "precision": Precision,
    "decode": DecodeMode,
    "embedding_dtype": EmbeddingDtype,
    "engine": Engine,
}
