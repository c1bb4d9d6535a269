"""Image pipeline: a generated 512x512 RGB image cut into 4x4 tiles, each filtered by a chain of
four tasks (grayscale -> gaussian blur -> edge enhance -> contrast stretch), then merged.

Run it with: dagkube run examples/image_pipeline.py
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import dagkube

SIZE = 512
GRID = 4
SEED = 3
BLUR_RADIUS = 2.0


def make_image(size: int, seed: int) -> np.ndarray:
    """An RGB uint8 image: colour gradients, a few filled shapes and seeded noise."""
    ramp = np.linspace(0, 255, size)
    red = np.tile(ramp, (size, 1))
    green = red.T
    blue = (red + green) / 2
    base = np.stack([red, green, 255 - blue], axis=-1).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for _ in range(12):
        x0, y0 = (int(v) for v in rng.integers(0, size - 64, 2))
        x1, y1 = x0 + int(rng.integers(32, 160)), y0 + int(rng.integers(32, 160))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


def split_tiles(image: np.ndarray, grid: int) -> list[list[np.ndarray]]:
    """Rows of tiles; copies, so each tile is a small array of its own to ship to a worker."""
    rows = np.array_split(image, grid, axis=0)
    return [[tile.copy() for tile in np.array_split(row, grid, axis=1)] for row in rows]


# Tasks take and return numpy arrays (PIL images are only used inside a task) and never modify
# their input in place: a worker may hand the very same object to another task.
@dagkube.task
def grayscale(tile: np.ndarray) -> np.ndarray:
    return np.array(Image.fromarray(tile).convert("L"))


@dagkube.task
def gaussian_blur(tile: np.ndarray, radius: float) -> np.ndarray:
    return np.array(Image.fromarray(tile).filter(ImageFilter.GaussianBlur(radius)))


@dagkube.task
def edge_enhance(tile: np.ndarray) -> np.ndarray:
    return np.array(Image.fromarray(tile).filter(ImageFilter.EDGE_ENHANCE_MORE))


@dagkube.task
def stretch_contrast(tile: np.ndarray) -> np.ndarray:
    """Map the tile's 2nd..98th percentile range onto 0..255 (numpy only)."""
    low, high = np.percentile(tile, [2, 98])
    scaled = (tile.astype(np.float64) - low) * (255 / max(high - low, 1.0))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@dagkube.task
def merge(tiles: list[list[np.ndarray]]) -> np.ndarray:
    return np.block(tiles)


def build() -> dagkube.Workflow:
    tiles = split_tiles(make_image(SIZE, SEED), GRID)
    processed = [
        [
            stretch_contrast(edge_enhance(gaussian_blur(grayscale(tile), BLUR_RADIUS)))
            for tile in row
        ]
        for row in tiles
    ]
    return dagkube.Workflow(merge(processed), name="image-pipeline")


def verify(result: np.ndarray) -> None:
    assert isinstance(result, np.ndarray), f"expected an ndarray, got {type(result).__name__}"
    assert result.shape == (SIZE, SIZE), f"shape {result.shape}, expected {(SIZE, SIZE)}"
    assert result.dtype == np.uint8, f"dtype {result.dtype}, expected uint8"
    # The blur sees each tile's own borders, so the reference is the same per-tile chain, run
    # serially here on the plain functions, not the filter applied to the whole image.
    expected_rows = []
    for row in split_tiles(make_image(SIZE, SEED), GRID):
        expected_row = []
        for tile in row:
            gray = grayscale.fn(tile)
            blurred = gaussian_blur.fn(gray, BLUR_RADIUS)
            expected_row.append(stretch_contrast.fn(edge_enhance.fn(blurred)))
        expected_rows.append(expected_row)
    expected = np.block(expected_rows)
    mismatched = int(np.count_nonzero(result != expected))
    assert mismatched == 0, f"{mismatched} pixels differ from the serial per-tile reference"
    assert result.std() > 10, "the filtered image is nearly uniform: the pipeline lost the content"
