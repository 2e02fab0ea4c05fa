"""The finishing step between moderation and cache: logo, EXIF metadata and JPEG encoding.

Runs in the CPU executor. EXIF carries the parameters as JSON in `UserComment` (without the prompt
when the request is private) and the model name in `Make`, as image.pollinations.ai does.
"""

from __future__ import annotations

import io

import orjson
from PIL import Image, ImageDraw, ImageFont

from .params import JPEG_QUALITY, ImageParams

LOGO_TEXT = "image_service"
EXIF_MAKE = 0x010F
EXIF_IFD = 0x8769
EXIF_USER_COMMENT = 0x9286
# EXIF 2.3 §4.6.5: UserComment starts with an 8-byte character-code header.
USER_COMMENT_ASCII = b"ASCII\x00\x00\x00"
USER_COMMENT_UNICODE = b"UNICODE\x00"


def _draw_logo(image: Image.Image) -> None:
    size = max(10, min(image.width, image.height) // 40)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(image, "RGBA")
    left, top, right, bottom = draw.textbbox((0, 0), LOGO_TEXT, font=font)
    margin = size // 2
    x = image.width - (right - left) - margin
    y = image.height - (bottom - top) - margin
    draw.text((x + 1, y + 1), LOGO_TEXT, font=font, fill=(0, 0, 0, 110))
    draw.text((x, y), LOGO_TEXT, font=font, fill=(255, 255, 255, 190))


def user_comment(params: ImageParams, show_logo: bool) -> bytes:
    text = orjson.dumps(params.exif_dict(show_logo))
    if text.isascii():
        return USER_COMMENT_ASCII + text
    return USER_COMMENT_UNICODE + text.decode().encode("utf-16-be")


def encode_jpeg(image: Image.Image, params: ImageParams, show_logo: bool) -> bytes:
    """Return the JPEG served to clients; `show_logo` is false for flagged images and nologo/nofeed."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if show_logo:
        image = image.copy() if image.readonly else image
        _draw_logo(image)
    exif = Image.Exif()
    exif[EXIF_MAKE] = params.model
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = user_comment(params, show_logo)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY[params.quality], exif=exif)
    return out.getvalue()
