"""Images and videos for requests, made locally (no downloads)."""

from __future__ import annotations

import base64
import io
import os
import tempfile

import numpy as np


def png_data_url(seed: int, side: int = 224) -> str:
    from PIL import Image

    arr = (np.random.RandomState(seed).rand(side, side, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mp4_data_url(n_frames: int = 8, size: int = 224, fps: int = 4, noise: int | None = None) -> str:
    """A moving white square on coloured frames; ``noise``: a seed for random pixel noise on
    every frame (no two patches alike, so no exact ties between tokens)."""
    import cv2

    rng = np.random.RandomState(noise) if noise is not None else None
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
        for i in range(n_frames):
            frame = np.zeros((size, size, 3), np.uint8)
            frame[:, :, i % 3] = 40 + 25 * i
            cv2.rectangle(frame, (10 + 15 * i, 50), (60 + 15 * i, 100), (255, 255, 255), -1)
            if rng is not None:
                frame = np.clip(frame + rng.randint(0, 60, frame.shape), 0, 255).astype(np.uint8)
            writer.write(frame)
        writer.release()
        with open(path, "rb") as f:
            data = f.read()
    finally:
        os.remove(path)
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def image_part(seed: int, side: int = 224) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(seed, side)}}


def video_part(n_frames: int = 8, size: int = 224, noise: int | None = None) -> dict:
    return {"type": "video_url", "video_url": {"url": mp4_data_url(n_frames, size, noise=noise)}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}
