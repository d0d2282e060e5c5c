"""Test media made on the spot: numbered MP4 videos (and reading numbers back), and a real face photo."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

BITS = 12  # frame numbers 0..4095 fit
BAND = 3  # the bit blocks fill the top 1/BAND of the frame: large, so lossy MP4 cannot flip one
SIDE = 16  # the gray sample in a block's centre, in pixels

Frame = npt.NDArray[np.uint8]


def numbered_frame(number: int, width: int = 320, height: int = 240) -> Frame:
    """A BGR frame whose top band shows `number` in binary: BITS blocks, white = 1, black = 0."""
    frame = np.full((height, width, 3), 96, np.uint8)
    block_w, block_h = width // BITS, height // BAND
    for bit in range(BITS):
        if number >> (BITS - 1 - bit) & 1:
            frame[:block_h, bit * block_w:(bit + 1) * block_w] = 255
        else:
            frame[:block_h, bit * block_w:(bit + 1) * block_w] = 0
    x = (number * 7) % max(1, width - 40)  # something moves, like in a real video
    frame[height // 2:height // 2 + 40, x:x + 40] = (0, 160, 255)
    cv2.putText(frame, str(number), (8, height - 12), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
    return frame


def frame_number(frame: npt.NDArray[np.uint8]) -> int:
    """Read back the number `numbered_frame` drew, from a BGR or gray frame of any size."""
    gray = frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    height, width = gray.shape
    block_w, block_h = width // BITS, height // BAND
    half = min(SIDE, block_w, block_h) // 2
    number = 0
    for bit in range(BITS):
        cx, cy = bit * block_w + block_w // 2, block_h // 2
        level = float(gray[cy - half:cy + half, cx - half:cx + half].mean())
        number = number << 1 | (level > 127)
    return number


def write_numbered_video(path: Path, frames: int = 64, width: int = 320, height: int = 240,
                         fps: float = 30.0) -> Path:
    """An MP4 (mp4v) of `frames` numbered frames, 0 first."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for number in range(frames):
        writer.write(numbered_frame(number, width, height))
    writer.release()
    return path


def decode_numbers(*paths: Path) -> list[int]:
    """The frame number of every frame of the videos, in order, decoded through OpenCV."""
    numbers = []
    for path in paths:
        capture = cv2.VideoCapture(str(path))
        assert capture.isOpened(), f"OpenCV cannot read {path}"
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            numbers.append(frame_number(np.asarray(frame, np.uint8)))
        capture.release()
    return numbers


def recorded_video(node_dir: Path, port: str = "video") -> tuple[list[int], list[dict[str, str]]]:
    """Decode a recorded port: (frame numbers of all `<port>-NNNN.mp4` in order, timestamp rows)."""
    segments = sorted(node_dir.glob(f"{port}-*.mp4"))
    with open(node_dir / f"{port}.timestamps.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return decode_numbers(*segments), rows


# Eileen Collins, NASA astronaut: a 64x64 gray JPEG crop of NASA's public-domain portrait (as shipped
# in scikit-image's sample data). OpenCV's frontal-face Haar cascade finds one face of about 40x40 at
# (13, 14) in it. Small, so that a real face is at hand without a data package.
FACE_JPEG = """
/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAUDBAQEAwUEBAQFBQUGBwwIBwcHBw8LCwkMEQ8SEhEPERETFhwXExQaFRERGCEYGh0d
Hx8fExciJCIeJBweHx7/wAALCABAAEABAREA/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUF
BAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVW
V1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi
4+Tl5ufo6erx8vP09fb3+Pn6/9oACAEBAAA/APaTeRpEzyMFVRkkmuD1rx9avfvY2MyIg+UzdefYV4rrWgavqPxXn1aS/mht1AHm
TglXwPun2Jyfzr07w7FJaYibT4d2dxaMK+7/AHelaWvazK8a29rf3Fk0gxuktS6r7Acrn3rkr631COxkubuWK9RSTkrjj1C54rnd
E16aw8+/trhLe5RiYzG/3l6/dweQOvXjmvevht4ih8W+GEvxgXMTeVcoP4XHf6EYP41x/wAVdae1Sx00SeXHch3lOcZC4AX8Sf0r
zEW0unX51C+Zo4kOV54GPT3Nb+p+ZqWnRyf2tKjPh0Urg4zxVfQp7yKeMTSJG5O1nTGM/lnn612puo3iWNp03dSpZgGA9MH07H06
Vzvj640yLSGn0ieS3ukUl4zJneB1259ua8X0Fr+PUzrDtK9qhPy+YCBnjAGcng167+y1qNzZ+NdS0ue4YW99b74UdcbnQg8fQM35
VrfHZbZYtJnmcJMryLGSOP4Sf5V5b4y1qW80+z0uMeagcs/fcTwMmvoXS/B+j6l4fs7WeC6NzDEoMsETHbgDOSB7VetPhjoN7HI8
GpOJ0OODtYcdx1BrI8SfCQxxx3Flr32eRGDEvwD9TXhnxP8ACvirR71JBdWupW6n7sEoZyMYOV6157pt9HFctay26x3UIZX3Ocg+
uB1r0X4SXl6vxU8PXtudyNP5DLxkB1Kn9MmvXPjv4VvPEPhBZNPSSSeyk84xR/ekTHzAe/Q474r5/wDhpHLqHi6w064jfyluAWDD
ng5Ofyr6u13wp4h1DTymleILrTEEWI1hJUb8g7m28ngEY96ueDdN1fSJrePU7+4umSNVLznLOwHzNnjgmqHiF9X1rW7y2srsW6QI
SgxnLEHaT7ZxXC6nZeNLiwttN8Ri3vxNu8w+SoERB+Uqw9vX/wCtXzr4s002XxNkSVfld13EehG0n8xXqX7Nmhx3fxAvdQFrKF0V
GVZi2U81/lA/753Gvpizi3HkVyereAtDttdfxHa26wXIzIxUfKTjn8+v1rsrbxDp9lpLNcOWYqAig8luwH+FUJNT8yWJ71ltZH7M
Cdo9zXInX7Sw8YyGCZbiF8K5iGSPcfpW/wCMb22XQjcRyqxIyv0r5nvPAXibxt8SkGnQiO2lA33T/ciQHJb3PoPXFfUHgjwnpnhH
w/HpGnoWAJkmmYDfNIfvO3v/ACAArQl1XSdKydRv4IPZm5/Ic1iat8SPA6wTWra0itJGyA+U/cY9K0NFtbHUtKSdGHmbN0UqYJXI
6iptDtrw2c0V/qEM00a7XeezyknHB+U8ZOOO1cN4s064bW7e20e70xGd8vIlow2rn+EZGSfy+vSpfiFax2dra6fBLJNKcErnJLHg
D6k16LoGk2Gi6TDb21tDHKIkWZ0UAuwHJJ785q3s3jpX5x+IfG3jDxjqTqlxchZMlba1JAA9yOT9TXLGC4L5lkG4nnc+TX6B+AJJ
7DwVol8ilrV7GETY52HYMn6V25jtLqyMySph8FcOOa4nxReWOiSC4eVTP/DlhwKpfDxj4m8XyXtwpljtIvNQt3fICnHtzj6V6l5Z
AO4URY5zXwx498MWXws8N2+nuY7jXtRg827nI/1a/wAMcfoOpJ7nbXjcaSPKHfIAOcnvX0l8Iv2jI9B8KW/h/wASaJJfw26CKK4t
pAH2AYAZW4Jx3yK2rv4ufDvUXeS11TxJ4fd+SViygPrhGb+VZN14v8ELB9uuPGSak+fvS79//fBGf0ri7r43Xei+L7a+8LtI1jEu
2YOuwy89V7jj14OeRX1h8IfipovxB0qJoZUjvSMGM8biByMdmHp+IyK7xkbdgDFf/9k=
"""


def face_image() -> Frame:
    """The 64x64 gray face photo above, decoded."""
    data = np.frombuffer(base64.b64decode("".join(FACE_JPEG.split())), np.uint8)
    image = np.asarray(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE), np.uint8)
    assert image.shape == (64, 64)
    return image
