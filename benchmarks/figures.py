"""Image grids with row and column labels, for before/after comparisons and the README's figures."""

from __future__ import annotations

from PIL import Image, ImageDraw

from erasers.images import image_grid

__all__ = ["image_grid", "labelled_grid"]


def labelled_grid(images: list[Image.Image], columns: int, row_labels: list[str] = (),
                  column_labels: list[str] = (), scale: int = 1) -> Image.Image:
    grid = image_grid(images, columns, scale)
    cell_w, cell_h = grid.width // columns, grid.height // max(1, -(-len(images) // columns))
    left = 6 * max((len(label) for label in row_labels), default=0) + (8 if row_labels else 0)
    top = 16 if column_labels else 0
    canvas = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(column_labels):
        draw.text((left + i * cell_w + 2, 2), label[: max(1, cell_w // 6)], fill="black")
    for j, label in enumerate(row_labels):
        draw.text((4, top + j * cell_h + cell_h // 2 - 5), label, fill="black")
    return canvas
