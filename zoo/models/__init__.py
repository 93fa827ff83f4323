from zoo.models.densenet import DenseNet
from zoo.models.resnext import Bottleneck, ResNet

__all__ = ["Bottleneck", "DenseNet", "ResNet"]
