"""Drawing helpers for the tasks' pictures (``TrainingTask.pictures``): model-agnostic.

matplotlib's Agg canvas only (no display, no global backend, no pyplot
state); PNGs are written atomically. Maps are h×w float arrays, images
H×W×3 uint8.
"""
import numpy as np

from .checkpoint import replaced_atomically
from .errors import writing


def display_images(data, mean, std, scale=255.0):
    """Network input N×3×S×S normalised as ``(pixels / scale - mean) / std`` (per
    channel) -> N×S×S×3 uint8: the images as the network sees them."""
    x = np.asarray(data, dtype=np.float32).transpose(0, 2, 3, 1)
    pixels = (x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)) * scale
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def upsample(attention_map, height, width):
    """h×w map -> height×width float32 (bilinear)."""
    from PIL import Image
    image = Image.fromarray(np.ascontiguousarray(attention_map, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)


def new_figure(width, height, dpi=100):
    """A matplotlib Figure (size in inches) on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path, grid=False):
    """Write ``figure`` as a PNG to ``path`` atomically; returns ``path``. ``grid``: a grid
    of image panels (fixed margins; tight_layout costs seconds for dozens of axes)."""
    if grid:
        top = 1.0 - 0.8 / figure.get_size_inches()[1]  # 0.8 inch for the title
        figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.08, hspace=0.45)
    else:
        figure.tight_layout()
    with writing(path), replaced_atomically(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def show_image(axis, image, title=None):
    axis.imshow(image)
    if title:
        axis.set_title(title, fontsize=7)
    axis.axis("off")


def overlay(axis, image, attention_map, title=None, alpha=0.5):
    """``image`` (H×W×3 uint8) in grey with ``attention_map`` (h×w) upsampled on it,
    coloured over the map's own range (jet)."""
    height, width = image.shape[:2]
    axis.imshow(image.mean(axis=2), cmap="gray", vmin=0, vmax=255)
    upsampled = upsample(attention_map, height, width)
    low, high = float(upsampled.min()), float(upsampled.max())
    axis.imshow(upsampled, cmap="jet", alpha=alpha, vmin=low, vmax=high if high > low else low + 1e-12)
    if title:
        axis.set_title(title, fontsize=7)
    axis.axis("off")
