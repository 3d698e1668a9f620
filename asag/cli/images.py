"""A pipeline's outputs as PIL images, saved as PNG with their settings in the file, and the
labelled grids that ``compare``, ``sweep`` and ``evaluate`` write."""

import json
import re
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .loading import CLIError

METADATA_KEY = "asag"
GAP = 4  # pixels between a grid's cells
Picture = Union["PIL.Image.Image", List["PIL.Image.Image"]]  # noqa: F821  (an image or a video's frames)


def _to_pil(item):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    array = item.detach().float().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def pictures(result) -> List[Picture]:
    """The images (or videos, as frame lists) of a pipeline's output, as PIL."""
    if hasattr(result, "images") and result.images is not None:
        return [_to_pil(image) for image in result.images]
    if hasattr(result, "frames") and result.frames is not None:
        return [[_to_pil(frame) for frame in video] for video in result.frames]
    kind = type(result).__name__
    raise CLIError(f"the pipeline returned {kind} without images or frames (audio?): asag's command line writes images and videos only")


def first_frame(picture: Picture):
    return picture[len(picture) // 2] if isinstance(picture, list) else picture


def save(picture: Picture, path: str, metadata: Dict) -> None:
    """A PNG (an animated PNG for frames) holding ``metadata`` as JSON in a text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True, default=str))
    if isinstance(picture, list):
        picture[0].save(path, save_all=True, append_images=picture[1:], duration=125, loop=0, pnginfo=info)
    else:
        picture.save(path, pnginfo=info)


def read_metadata(path: str) -> Optional[Dict]:
    """The settings saved in a PNG by :func:`save` (None if it holds none or cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.text.get(METADATA_KEY) if hasattr(image, "text") else None
    except (OSError, ValueError):
        return None
    return json.loads(text) if text else None


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _pieces(draw, text: str, font, width: int) -> List[str]:
    """``text`` in pieces a line may break between: after spaces, commas and colons (method
    specifications such as ``asag:scale=3,lam=2`` have no spaces), and inside a piece that is
    wider than a line by itself."""
    pieces = []
    for piece in re.findall(r"[^\s,:]*[,:]|[^\s,:]+\s*|\s+", text):
        while len(piece) > 1 and draw.textlength(piece, font=font) > width:
            cut = len(piece) - 1
            while cut > 1 and draw.textlength(piece[:cut], font=font) > width:
                cut -= 1
            pieces.append(piece[:cut])
            piece = piece[cut:]
        pieces.append(piece)
    return pieces


def _wrap(draw, text: str, font, width: int, lines: int = 2) -> List[str]:
    """``text`` cut into at most ``lines`` lines that fit ``width`` pixels (the last one elided)."""
    out, current = [], ""
    for piece in _pieces(draw, text, font, width):
        trial = current + piece
        if draw.textlength(trial.rstrip(), font=font) <= width or not current.strip():
            current = trial
        else:
            out.append(current.rstrip())
            current = piece.lstrip()
    out.append(current.rstrip())
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1] + "…"
    return out


def grid(cells: Sequence[Sequence], row_labels: Sequence[str], column_labels: Sequence[str],
         cell: int = 256, title: str = "", font_size: int = 16):
    """A labelled grid: ``cells[r][c]`` a PIL image (or frames: the middle one is shown) or
    None. Images are scaled to ``cell`` pixels on their longer side."""
    from PIL import Image, ImageDraw

    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + 4
    gap = GAP
    # Row labels get at least 240 pixels (more with big cells) and as many lines as they need,
    # up to 6: a row is taller than its images rather than its label unreadable.
    widest = max([probe.textlength(label, font=font) for label in row_labels] + [0])
    label_w = int(min(widest + 16, max(2 * cell, 240)))
    wrapped = [_wrap(probe, label, font, label_w - 12, lines=6) for label in row_labels]
    row_h = [max(cell, len(lines) * line_h + 8) for lines in wrapped]
    header_h = 2 * line_h + 8
    title_h = line_h + 8 if title else 0
    width = int(label_w + len(column_labels) * (cell + gap))
    height = int(title_h + header_h + sum(h + gap for h in row_h))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((8, 4), title, fill="black", font=font)
    for c, label in enumerate(column_labels):
        for i, line in enumerate(_wrap(draw, label, font, cell - 4)):
            draw.text((label_w + c * (cell + gap) + 2, title_h + 4 + i * line_h), line, fill="black", font=font)
    for r, lines in enumerate(wrapped):
        top = title_h + header_h + sum(h + gap for h in row_h[:r])
        for i, line in enumerate(lines):
            draw.text((6, top + 4 + i * line_h), line, fill="black", font=font)
        for c, picture in enumerate(cells[r]):
            if picture is None:
                continue
            image = first_frame(picture).convert("RGB")
            factor = cell / max(image.size)
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            resample = Image.NEAREST if factor >= 4 else Image.LANCZOS
            canvas.paste(image.resize(size, resample), (int(label_w + c * (cell + gap)), top))
    return canvas
