"""Images: records -> uint8 pixels.

``sources`` lists folders, manifests and URIs as :class:`~embedpipe.images.sources.ImageRecord`
rows; ``decode`` turns one file into pixels or a typed failure; ``preprocess`` is the
resize and centre crop that travel with the weights; ``loader`` runs decoding in worker
processes that a crashing or hanging decoder cannot take down; ``thumbnails`` makes the
small previews that galleries and the service show; ``samples`` writes the real images
that packages ship (MNIST digits, photos) as folders. Nothing here imports torch.
"""
