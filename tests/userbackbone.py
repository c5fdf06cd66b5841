"""A user backbone, as a user's package would define one (``userbackbone:build``)."""

import os
import time

from torch import nn

from embedpipe.backbones import CustomBackbone
from embedpipe.images.preprocess import Preprocessing


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(x).relu()).flatten(1)


def build() -> CustomBackbone:
    return CustomBackbone(model=TinyNet(), dim=16, preprocessing=Preprocessing(resize_size=36, crop_size=32))


def build_wrong_dim() -> CustomBackbone:
    return CustomBackbone(model=TinyNet(), dim=8, preprocessing=Preprocessing(resize_size=36, crop_size=32))


class DiesOnRedImages(TinyNet):
    """Kills its process the first time a batch holds an all-red image: a worker lost
    mid-run (OOM-killed, preempted). ``EMBEDPIPE_TEST_DIE_FLAG`` names the file that
    marks the first attempt as spent."""

    def forward(self, x):
        flag = os.environ["EMBEDPIPE_TEST_DIE_FLAG"]
        red = (x[:, 0] > 2).flatten(1).all(1) & (x[:, 1] < -2).flatten(1).all(1)  # ImageNet-normalised
        if bool(red.any()) and not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(1)
        return super().forward(x)


class Slow(TinyNet):
    """A twentieth of a second per batch, so that a test can kill a job part-way."""

    def forward(self, x):
        time.sleep(0.05)
        return super().forward(x)


def build_dies_once() -> CustomBackbone:
    return CustomBackbone(model=DiesOnRedImages(), dim=16, preprocessing=Preprocessing(resize_size=36, crop_size=32))


def build_slow() -> CustomBackbone:
    return CustomBackbone(model=Slow(), dim=16, preprocessing=Preprocessing(resize_size=36, crop_size=32))
