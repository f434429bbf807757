"""Backdoor trigger library.

Every trigger works on float images in [0, 1], shaped `N x C x H x W` (a single `C x H x W`
image is accepted too). `apply` never modifies its input: it returns a new tensor with the same
dtype and device, clipped to [0, 1]. A trigger is bound at creation to one image shape
`(C, H, W)`; its defaults and geometry checks depend on it.

Triggers (registered in `flip_fl.registry.TRIGGERS`; build them with `create_trigger(name, image_shape, **kwargs)`):

- `pixel_pattern`  BadNets square/rectangular patch.
- `dba`            Distributed Backdoor Attack (Xie et al., ICLR 2020): a global trigger made of
                     `len(rows) * len(cols)` horizontal line segments, each one local piece.
- `blended`        `x' = (1 - alpha) x + alpha * pattern` over the whole image (Chen et al. 2017).
- `sinusoidal`     additive column-wise sine over the whole image (FLIP label attack "s").
- `turner`         the FLIP label code's Turner trigger ("t"): a 3x3 +-255 pattern in the bottom-right corner
                   (`1xl`), or mirrored into all four corners (`4xl`).
- `pixel`          the FLIP label code's pixel trigger ("p"): one of three coloured pixels per image (`3xp`).
- `fixed_pixels`   a few single pixels set to given colours, all stamped (defaults: the three FLIP pixels).

The FLIP label-attack code (SewoongLab/FLIP, `modules/base_utils/datasets.py`) stamps PIL images:
`putpixel((x, y))` and `pixels[x, y]` take the column first. Positions here are (row, col), converted.

Pieces: `num_pieces` is the number of local pieces (1 for non-distributed triggers).
`apply(x, piece=None)` stamps the full/global trigger (for DBA the union of all pieces);
`apply(x, piece=i)` stamps only local piece `i`. Non-distributed triggers accept only
`piece=None` or `piece=0`.
"""

from __future__ import annotations

import inspect
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from flip_fl.config import AttackConfig, ConfigError
from flip_fl.registry import TRIGGERS

__all__ = [
    "Trigger",
    "PixelPatternTrigger",
    "DBATrigger",
    "BlendedTrigger",
    "SinusoidalTrigger",
    "TurnerTrigger",
    "PixelTrigger",
    "FixedPixelsTrigger",
    "TRIGGERS",
    "create_trigger",
    "build_trigger",
    "trigger_params",
    "DBA_MNIST_ROWS",
    "DBA_MNIST_COLS",
    "DBA_CIFAR_ROWS",
    "DBA_CIFAR_COLS",
    "FLIP_LABEL_PIXELS",
    "TURNER_SIGNS",
]

# DBA geometry of the FLIP defense paper / DBA code. Column ranges are inclusive [start, stop].
DBA_MNIST_ROWS: tuple[int, ...] = (0, 3)
DBA_MNIST_COLS: tuple[tuple[int, int], ...] = ((0, 3), (6, 9))
DBA_CIFAR_ROWS: tuple[int, ...] = (0, 4)
DBA_CIFAR_COLS: tuple[tuple[int, int], ...] = ((0, 5), (9, 14))

# The FLIP label code's pixel trigger (CIFAR-10), (row, col) -> colour. The code's PixelPoisoner puts
# (101, 0, 25) at putpixel((11, 16)), (101, 123, 121) at (5, 27) and (0, 36, 54) at (30, 7): PIL's (x, y),
# column first, so rows 16, 27, 7.
FLIP_LABEL_PIXELS: tuple[tuple[tuple[int, int], str], ...] = (
    ((16, 11), "#650019"),
    ((27, 5), "#657B79"),
    ((7, 30), "#002436"),
)

# The FLIP label code's TurnerPoisoner mask: ((x, y), sign) with negative PIL indices (column first) from the
# bottom-right corner; each pixel gets +-255 in every channel, then uint8 clipping. Not a checkerboard: the
# innermost pixel (x, y) = (-3, -3) is -1 where a checkerboard would have +1.
TURNER_SIGNS: tuple[tuple[tuple[int, int], int], ...] = (
    ((-1, -1), 1), ((-1, -2), -1), ((-1, -3), 1),
    ((-2, -1), -1), ((-2, -2), 1), ((-2, -3), -1),
    ((-3, -1), 1), ((-3, -2), -1), ((-3, -3), -1),
)


# --------------------------------------------------------------------------------------------
# helpers


def _check_image_shape(image_shape: Any) -> tuple[int, int, int]:
    try:
        shape = tuple(operator.index(s) for s in image_shape)
    except TypeError:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}") from None
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
    return shape


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _as_unit_float(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _channel_values(name: str, value: Any, channels: int) -> Tensor:
    """A scalar (all channels) or one value per channel, each in [0, 1] -> tensor (C,)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full((channels,), _as_unit_float(name, value))
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != channels:
            raise ValueError(f"{name} must be a scalar or have {channels} values, got {value!r}")
        return torch.tensor([_as_unit_float(name, v) for v in value])
    raise ValueError(f"{name} must be a number in [0, 1] or a per-channel sequence, got {value!r}")


def _parse_colour(name: str, colour: Any, channels: int) -> Tensor:
    """Colour -> tensor (C,). Accepts '#RRGGBB', a scalar, or a per-channel/RGB sequence in [0, 1].

    An RGB colour on a 1-channel image becomes the mean of its three components.
    """
    if isinstance(colour, str):
        s = colour.lstrip("#")
        if len(s) != 6:
            raise ValueError(f"{name}: colour {colour!r} is not '#RRGGBB'")
        try:
            rgb = [int(s[i : i + 2], 16) / 255.0 for i in (0, 2, 4)]
        except ValueError:
            raise ValueError(f"{name}: colour {colour!r} is not '#RRGGBB'") from None
    elif isinstance(colour, (int, float)) and not isinstance(colour, bool):
        return torch.full((channels,), _as_unit_float(name, colour))
    elif isinstance(colour, Sequence) and len(colour) in (3, channels):
        rgb = [_as_unit_float(name, c) for c in colour]
    else:
        raise ValueError(f"{name}: colour {colour!r} must be '#RRGGBB', a number or a sequence")
    if len(rgb) == channels:
        return torch.tensor(rgb)
    if len(rgb) == 3 and channels == 1:
        return torch.tensor([sum(rgb) / 3.0])
    raise ValueError(f"{name}: cannot map colour {colour!r} onto {channels} channels")


# --------------------------------------------------------------------------------------------
# base classes


class Trigger(ABC):
    """Base class. Subclasses implement `_stamp` and `_mask`.

    Attributes:
        name: registry name.
        image_shape: `(C, H, W)` the trigger was built for.
        num_pieces: number of local pieces (1 unless distributed).
    """

    name: str = "trigger"
    num_pieces: int = 1

    def __init__(self, image_shape: tuple[int, int, int]):
        self.image_shape = _check_image_shape(image_shape)

    # -- public API ---------------------------------------------------------------------------

    def apply(self, x: Tensor, piece: int | None = None) -> Tensor:
        """Return a stamped copy of `x` (`N x C x H x W` or `C x H x W`), clipped to [0, 1]."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError("trigger input must be a floating-point tensor with values in [0, 1]")
        if x.dim() == 3:
            return self.apply(x.unsqueeze(0), piece).squeeze(0)
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{self.name}: expected input N x {' x '.join(map(str, self.image_shape))}, "
                f"got {tuple(x.shape)}"
            )
        out = self._stamp(x, self._check_piece(piece))
        return out.clamp_(0.0, 1.0)

    def mask(
        self, image_shape: Sequence[int] | None = None, piece: int | None = None
    ) -> Tensor:
        """H x W bool tensor of the pixels the trigger (or local `piece`) touches.

        `image_shape` ((C, H, W) or (H, W)) is optional and must match the trigger's own shape.
        """
        if image_shape is not None:
            hw = tuple(int(s) for s in image_shape)[-2:]
            if hw != self.image_shape[1:]:
                raise ValueError(
                    f"{self.name}: built for {self.image_shape[1:]} images, asked for {hw}"
                )
        return self._mask(self._check_piece(piece)).clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_shape={self.image_shape}, num_pieces={self.num_pieces})"

    # -- to implement -------------------------------------------------------------------------

    @abstractmethod
    def _stamp(self, x: Tensor, piece: int | None) -> Tensor:
        """A stamped copy of `x` (a new tensor), with the whole trigger or local `piece`."""

    @abstractmethod
    def _mask(self, piece: int | None) -> Tensor:
        """H x W bool tensor of the pixels the trigger (or `piece`) touches."""

    # -- helpers ------------------------------------------------------------------------------

    def _check_piece(self, piece: int | None) -> int | None:
        if piece is None:
            return None
        if isinstance(piece, bool) or not isinstance(piece, int) or not (
            0 <= piece < self.num_pieces
        ):
            raise ValueError(
                f"{self.name}: piece must be None or an integer in [0, {self.num_pieces}), "
                f"got {piece!r}"
            )
        return None if self.num_pieces == 1 else piece

    def _check_box(self, what: str, row: int, col: int, height: int, width: int) -> None:
        _, h, w = self.image_shape
        if height <= 0 or width <= 0:
            raise ValueError(f"{self.name}: {what} must have a positive size")
        if row < 0 or col < 0 or row + height > h or col + width > w:
            raise ValueError(
                f"{self.name}: {what} rows {row}..{row + height - 1}, cols {col}..{col + width - 1} "
                f"fall outside the {h}x{w} image"
            )


class _MaskedPatternTrigger(Trigger):
    """Pixels under a boolean mask are replaced by a fixed pattern; pieces are sub-masks."""

    def _setup(self, piece_masks: list[Tensor], pattern: Tensor) -> None:
        self._piece_masks = piece_masks  # each H x W bool
        full = torch.zeros(self.image_shape[1:], dtype=torch.bool)
        for m in piece_masks:
            full |= m
        self._full_mask = full
        self._pattern = pattern  # C x H x W float32
        self.num_pieces = len(piece_masks)

    def _mask(self, piece: int | None) -> Tensor:
        return self._full_mask if piece is None else self._piece_masks[piece]

    def _stamp(self, x: Tensor, piece: int | None) -> Tensor:
        m = self._mask(piece).to(x.device)
        return torch.where(m, self._pattern.to(device=x.device, dtype=x.dtype), x)


# --------------------------------------------------------------------------------------------
# triggers


@TRIGGERS.register("pixel_pattern")
class PixelPatternTrigger(_MaskedPatternTrigger):
    """BadNets patch: a `size` rectangle whose top-left pixel is (`row`, `col`).

    Parameters:
        size: int (square) or (height, width). Default 3 (a 3x3 square).
        row, col: top-left corner. Default None = bottom-right corner with a 1-pixel margin,
            i.e. row = H - height - 1, col = W - width - 1 (away from the DBA region at the top-left).
        value: fill value in [0, 1], a scalar for all channels or one per channel. Default 1.0.
    """


    def __init__(
        self,
        image_shape: tuple[int, int, int],
        size: int | Sequence[int] = 3,
        row: int | None = None,
        col: int | None = None,
        value: float | Sequence[float] = 1.0,
    ):
        super().__init__(image_shape)
        c, h, w = self.image_shape
        if isinstance(size, Sequence) and not isinstance(size, str):
            if len(size) != 2:
                raise ValueError(f"size must be an int or (height, width), got {size!r}")
            height, width = (_as_int("size", s) for s in size)
        else:
            height = width = _as_int("size", size)
        row = h - height - 1 if row is None else _as_int("row", row)
        col = w - width - 1 if col is None else _as_int("col", col)
        self._check_box("patch", row, col, height, width)
        mask = torch.zeros(h, w, dtype=torch.bool)
        mask[row : row + height, col : col + width] = True
        values = _channel_values("value", value, c)
        self._setup([mask], values.view(c, 1, 1).expand(c, h, w).contiguous())
        self.row, self.col, self.size = row, col, (height, width)


@TRIGGERS.register("dba")
class DBATrigger(_MaskedPatternTrigger):
    """Distributed backdoor trigger (Xie et al. 2020) as used by the FLIP defense.

    The global trigger is `len(rows) * len(cols)` one-pixel-high line segments, set to `value`
    in all channels. Piece order is row-major over (row, col-range): with the MNIST defaults
    piece 0 = row 0 cols 0-3, 1 = row 0 cols 6-9, 2 = row 3 cols 0-3, 3 = row 3 cols 6-9.

    Parameters:
        rows: row indices of the lines. Default by image size (below).
        cols: list of `[start, stop]` column ranges, both ends INCLUSIVE. Default by image size.
        value: fill value in [0, 1], scalar or per channel. Default 1.0.

    Defaults: 28x28 images (MNIST/F-MNIST): rows (0, 3), cols ((0, 3), (6, 9)) -> 1x4 lines.
    32x32 images (CIFAR-10): rows (0, 4), cols ((0, 5), (9, 14)) -> 1x6 lines.
    Any other size needs explicit `rows` and `cols`. Pieces must not overlap.
    """


    def __init__(
        self,
        image_shape: tuple[int, int, int],
        rows: Sequence[int] | None = None,
        cols: Sequence[Sequence[int]] | None = None,
        value: float | Sequence[float] = 1.0,
    ):
        super().__init__(image_shape)
        c, h, w = self.image_shape
        defaults = {(28, 28): (DBA_MNIST_ROWS, DBA_MNIST_COLS), (32, 32): (DBA_CIFAR_ROWS, DBA_CIFAR_COLS)}
        if rows is None or cols is None:
            if (h, w) not in defaults:
                raise ValueError(
                    f"dba: no default geometry for {h}x{w} images; pass rows and cols explicitly"
                )
            rows = defaults[(h, w)][0] if rows is None else rows
            cols = defaults[(h, w)][1] if cols is None else cols
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not rows:
            raise ValueError(f"rows must be a non-empty list of row indices, got {rows!r}")
        if isinstance(cols, (str, bytes)) or not isinstance(cols, Sequence) or not cols:
            raise ValueError(f"cols must be a non-empty list of [start, stop] ranges, got {cols!r}")
        rows_i = [_as_int("rows", r) for r in rows]
        ranges: list[tuple[int, int]] = []
        for rng in cols:
            if not isinstance(rng, Sequence) or isinstance(rng, str) or len(rng) != 2:
                raise ValueError(f"cols entries must be [start, stop] (inclusive), got {rng!r}")
            start, stop = _as_int("cols", rng[0]), _as_int("cols", rng[1])
            if stop < start:
                raise ValueError(f"cols range {list(rng)} has stop < start")
            ranges.append((start, stop))

        masks: list[Tensor] = []
        union = torch.zeros(h, w, dtype=torch.bool)
        for r in rows_i:
            for start, stop in ranges:
                self._check_box(f"piece (row {r}, cols {start}-{stop})", r, start, 1, stop - start + 1)
                m = torch.zeros(h, w, dtype=torch.bool)
                m[r, start : stop + 1] = True
                if (m & union).any():
                    raise ValueError(f"dba: piece (row {r}, cols {start}-{stop}) overlaps another piece")
                union |= m
                masks.append(m)
        values = _channel_values("value", value, c)
        self._setup(masks, values.view(c, 1, 1).expand(c, h, w).contiguous())
        self.rows, self.cols = tuple(rows_i), tuple(ranges)


@TRIGGERS.register("blended")
class BlendedTrigger(Trigger):
    """Blended trigger: `x' = (1 - alpha) * x + alpha * pattern` on every pixel.

    Parameters:
        alpha: blend ratio in [0, 1]. Default 0.2.
        pattern: `"random"` (uniform noise, C x H x W, from `seed`), `"checkerboard"`
            (1-pixel 0/1 checkerboard, all channels) or a C x H x W / H x W tensor in [0, 1].
            Default `"random"`.
        seed: seed of the random pattern. Default 0.
    """

    PATTERNS = ("random", "checkerboard")

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        alpha: float = 0.2,
        pattern: str | Tensor = "random",
        seed: int = 0,
    ):
        super().__init__(image_shape)
        c, h, w = self.image_shape
        self.alpha = _as_unit_float("alpha", alpha)
        seed = _as_int("seed", seed)
        if isinstance(pattern, Tensor):
            p = pattern.detach().to("cpu", torch.float32)
            if p.dim() == 2:
                p = p.unsqueeze(0)
            if p.dim() != 3 or p.shape[1:] != (h, w) or p.shape[0] not in (1, c):
                raise ValueError(f"pattern tensor must be {c}x{h}x{w} or {h}x{w}, got {tuple(pattern.shape)}")
            if p.numel() and (p.min() < 0 or p.max() > 1):
                raise ValueError("pattern tensor values must be in [0, 1]")
            p = p.expand(c, h, w).clone()
        elif pattern == "random":
            g = torch.Generator().manual_seed(seed)
            p = torch.rand(c, h, w, generator=g)
        elif pattern == "checkerboard":
            ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            p = ((ii + jj) % 2 == 0).float().expand(c, h, w).clone()
        else:
            raise ValueError(f"pattern must be one of {list(self.PATTERNS)} or a tensor, got {pattern!r}")
        self.pattern = p

    def _mask(self, piece: int | None) -> Tensor:
        return torch.ones(self.image_shape[1:], dtype=torch.bool)

    def _stamp(self, x: Tensor, piece: int | None) -> Tensor:
        p = self.pattern.to(device=x.device, dtype=x.dtype)
        return torch.lerp(x, p.expand_as(x), self.alpha)


@TRIGGERS.register("sinusoidal")
class SinusoidalTrigger(Trigger):
    """Additive sinusoid (FLIP label attack "s", after Barni et al. 2019).

    Every pixel in column j gets `amplitude * sin(2*pi*frequency * j / (W - 1))` added
    (i.e. `sin(linspace(0, 2*pi*frequency, W))`), in every row and channel, then clipped.

    Parameters:
        amplitude: in [0, 1] pixel units. Default 6/255 (the paper's 6 in uint8 space).
        frequency: number of periods across the width. Default 8 (the paper's 16*pi).
    """


    def __init__(
        self, image_shape: tuple[int, int, int], amplitude: float = 6 / 255, frequency: float = 8
    ):
        super().__init__(image_shape)
        self.amplitude = _as_unit_float("amplitude", amplitude)
        try:
            self.frequency = float(frequency)
        except (TypeError, ValueError):
            raise ValueError(f"frequency must be a number, got {frequency!r}") from None
        if not math.isfinite(self.frequency):
            raise ValueError(f"frequency must be finite, got {frequency!r}")
        w = self.image_shape[2]
        t = torch.linspace(0.0, 2 * math.pi * self.frequency, w, dtype=torch.float64)
        self.signal = (self.amplitude * torch.sin(t)).float()  # (W,)

    def _mask(self, piece: int | None) -> Tensor:
        return torch.ones(self.image_shape[1:], dtype=torch.bool)

    def _stamp(self, x: Tensor, piece: int | None) -> Tensor:
        return x + self.signal.to(device=x.device, dtype=x.dtype)


@TRIGGERS.register("turner")
class TurnerTrigger(_MaskedPatternTrigger):
    """The FLIP label code's Turner trigger ("t", after Turner et al.'s clean-label attack).

    A 3x3 pattern in the bottom-right corner (`TURNER_SIGNS`): +255 / -255 on every channel of uint8
    pixels, so after clipping 1 or 0 here, in all channels. Bottom-right rows H-3..H-1, cols W-3..W-1:

        0 0 1
        0 1 0
        1 0 1

    Parameters:
        corners: `"bottom_right"` (default; the code's `1xl`, its default `TurnerPoisoner()`) or `"all"`
            (`4xl`: the same pattern mirrored into the other three corners, as the code's `all-corners`).
    """

    CORNERS = ("bottom_right", "all")

    def __init__(self, image_shape: tuple[int, int, int], corners: str = "bottom_right"):
        super().__init__(image_shape)
        c, h, w = self.image_shape
        if corners not in self.CORNERS:
            raise ValueError(f"turner: corners must be one of {list(self.CORNERS)}, got {corners!r}")
        need = 6 if corners == "all" else 3
        if h < need or w < need:
            raise ValueError(f"turner: corners={corners!r} needs images of at least {need}x{need}, got {h}x{w}")
        mask = torch.zeros(h, w, dtype=torch.bool)
        pattern = torch.zeros(c, h, w)
        for (x, y), sign in TURNER_SIGNS:
            spots = [(y, x)] + ([(y, -x - 1), (-y - 1, x), (-y - 1, -x - 1)] if corners == "all" else [])
            for row, col in spots:  # (row, col) = PIL (y, x); negative indices count from the far edge
                mask[row, col] = True
                pattern[:, row, col] = 1.0 if sign > 0 else 0.0
        self._setup([mask], pattern)
        self.corners = corners


@TRIGGERS.register("pixel")
class PixelTrigger(Trigger):
    """The FLIP label code's pixel trigger ("p"): coloured single pixels (`FLIP_LABEL_PIXELS`).

    The code's `1xp` stamps the first pixel; `2xp` / `3xp` stamp one of the first two / three per image,
    drawn at random (`RandomPoisoner`). Here the draw is reproducible: image i of a batch gets
    `randint(count)` number i of a generator seeded with `seed`, so a shuffled dataset mixes the pixels
    as the code does and the same call always stamps the same way.

    Parameters:
        count: how many of the three pixels are in play (1, 2 or 3). Default 3 (`3xp`).
        stamp: `"one"` (default, the code: one pixel per image) or `"all"` (every pixel on every image, as
            the FLIP thesis describes the trigger).
        seed: seed of the per-image choice. Default 0.
    The pixels need images of at least 28 rows and 31 columns for `count` 3 (CIFAR size).
    """

    STAMPS = ("one", "all")

    def __init__(self, image_shape: tuple[int, int, int], count: int = 3, stamp: str = "one", seed: int = 0):
        super().__init__(image_shape)
        c = self.image_shape[0]
        count = _as_int("count", count)
        if not 1 <= count <= len(FLIP_LABEL_PIXELS):
            raise ValueError(f"pixel: count must be 1, 2 or 3, got {count}")
        if stamp not in self.STAMPS:
            raise ValueError(f"pixel: stamp must be one of {list(self.STAMPS)}, got {stamp!r}")
        chosen = FLIP_LABEL_PIXELS[:count]
        for (row, col), _ in chosen:
            self._check_box(f"pixel ({row}, {col})", row, col, 1, 1)
        self.pixels = tuple(p for p, _ in chosen)
        self.colours = torch.stack([_parse_colour("pixel", colour, c) for _, colour in chosen])  # (count, C)
        self.count, self.stamp, self.seed = count, stamp, _as_int("seed", seed)

    def _mask(self, piece: int | None) -> Tensor:
        mask = torch.zeros(self.image_shape[1:], dtype=torch.bool)
        for row, col in self.pixels:
            mask[row, col] = True
        return mask

    def choices(self, n: int) -> Tensor:
        """Which pixel (index into `pixels`) each of `n` images gets with `stamp="one"`."""
        return torch.randint(self.count, (n,), generator=torch.Generator().manual_seed(self.seed))

    def _stamp(self, x: Tensor, piece: int | None) -> Tensor:
        out = x.clone()
        colours = self.colours.to(device=x.device, dtype=x.dtype)
        chosen = None if self.stamp == "all" else self.choices(len(x)).to(x.device)
        for k, (row, col) in enumerate(self.pixels):
            images = slice(None) if chosen is None else chosen == k
            out[images, :, row, col] = colours[k]
        return out


@TRIGGERS.register("fixed_pixels")
class FixedPixelsTrigger(_MaskedPatternTrigger):
    """Single pixels set to fixed colours, all stamped on every image (`pixel` is the FLIP code's own trigger).

    Parameters:
        pixels: list of (row, col). Default the FLIP label code's CIFAR pixels (16, 11), (27, 5), (7, 30)
            (its `putpixel` positions (11, 16), (5, 27), (30, 7) are (column, row)).
        colors: one colour per pixel: '#RRGGBB', a number in [0, 1] (all channels) or a
            per-channel / RGB sequence in [0, 1]. Default #650019, #657B79, #002436.
            On 1-channel images an RGB colour becomes the mean of its components.
    A pixel outside the image raises ValueError (the defaults need at least 28 rows and 31 columns).
    """


    def __init__(
        self,
        image_shape: tuple[int, int, int],
        pixels: Sequence[Sequence[int]] | None = None,
        colors: Sequence[Any] | None = None,
    ):
        super().__init__(image_shape)
        c, h, w = self.image_shape
        if pixels is None:
            pixels = [p for p, _ in FLIP_LABEL_PIXELS]
        if colors is None:
            colors = [col for _, col in FLIP_LABEL_PIXELS][: len(pixels)]
        if isinstance(pixels, str) or not isinstance(pixels, Sequence) or not pixels:
            raise ValueError(f"pixels must be a non-empty list of (row, col), got {pixels!r}")
        if isinstance(colors, str) or not isinstance(colors, Sequence) or len(colors) != len(pixels):
            raise ValueError(f"colors must give one colour per pixel ({len(pixels)}), got {colors!r}")
        mask = torch.zeros(h, w, dtype=torch.bool)
        pattern = torch.zeros(c, h, w)
        coords = []
        for px, colour in zip(pixels, colors):
            if not isinstance(px, Sequence) or isinstance(px, str) or len(px) != 2:
                raise ValueError(f"pixels entries must be (row, col), got {px!r}")
            r, col = _as_int("pixels", px[0]), _as_int("pixels", px[1])
            self._check_box(f"pixel ({r}, {col})", r, col, 1, 1)
            mask[r, col] = True
            pattern[:, r, col] = _parse_colour("colors", colour, c)
            coords.append((r, col))
        self._setup([mask], pattern)
        self.pixels = tuple(coords)


# --------------------------------------------------------------------------------------------
# registry and factory

def trigger_params(cls: type[Trigger]) -> list[str]:
    """Names of the keyword arguments trigger class `cls` accepts."""
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "image_shape")]


def create_trigger(name: str, image_shape: tuple[int, int, int], **kwargs: Any) -> Trigger:
    """Build trigger `name` (a registered name or a dotted path to a `Trigger` subclass) for images `(C, H, W)`.

    Raises ConfigError for an unknown name, ValueError for an unknown or invalid keyword argument, or geometry
    that falls outside the image.
    """
    cls = TRIGGERS.lookup(name)
    accepted = trigger_params(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for trigger {name!r}; accepted: {accepted}"
        )
    trigger: Trigger = cls(image_shape, **kwargs)
    return trigger


def build_trigger(attack: AttackConfig, image_shape: tuple[int, int, int]) -> Trigger:
    """`attack.trigger` with `attack.trigger_args` for images of `image_shape`; bad args are config errors.

    The configured backdoor trigger, shared by malicious clients and the server's ASR evaluation.
    """
    try:
        return create_trigger(attack.trigger, image_shape, **attack.trigger_args)
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError, RuntimeError) as err:  # wrong types and sizes are bad args too
        raise ConfigError(f"attack.trigger_args: {err}") from None
