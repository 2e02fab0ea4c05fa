"""image_service: an image-generation gateway compatible with the image.pollinations.ai API."""

__version__ = "0.1.0"
