"""The sample project's model: diffin_core's SmallCNN for 1x28x28 digits."""
from diffin_core.engine.models import SmallCNN


def build():
    return SmallCNN(in_channels=1, num_classes=10, image_size=28)
