"""A user backbone, as a user's package would define one (``userbackbone:build``)."""

from torch import nn

from embedpipe.backbones import CustomBackbone
from embedpipe.preprocess import Preprocessing


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
