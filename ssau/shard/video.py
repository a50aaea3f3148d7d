"""Reading a record's pixels: an image file, or one frame of a video decoded while sharding (DISFA).

A video source is ``<path>#<0-based frame>``. Shards hold consecutive frames of one video, so each worker keeps
one decoder open and decodes forward; asking for an earlier frame reopens the file, unless it is one of the last
``keep`` frames decoded (``--flow K`` reads frame t+K before frame t+1: K + 1 frames are kept).

Only regular files are read: a FIFO, socket or device among the images (or as the video) would block the worker's
read for good or never end, so it is skipped as ``not-a-regular-file``, before any blocking open.
"""

from __future__ import annotations

import os
import stat
from collections import OrderedDict

from ssau.errors import InputError, SkipImage
from ssau.readfile import kind_of, open_regular
from ssau.shard.images import encode_jpeg, exception_detail


class _ForwardDecoder:
    def __init__(self) -> None:
        self.path: str | None = None
        self.container = None
        self.frames = None
        self.pos = -1
        self.last = None
        self.keep = 1
        self.recent: OrderedDict[int, object] = OrderedDict()  # index -> decoded frame, the last `keep` ones

    def _open(self, path: str) -> None:
        import av  # imported here: only video sources need it

        self.close()
        _regular(path)  # av.open of a FIFO blocks until a writer comes
        try:
            self.container = av.open(path)
        except (av.error.FFmpegError, OSError) as e:
            raise SkipImage("video-unreadable") from e
        self.path, self.frames, self.pos, self.last = path, self.container.decode(video=0), -1, None
        self.recent.clear()

    def frame(self, path: str, index: int) -> bytes:
        import av

        if path == self.path and index in self.recent:
            return self._encode(self.recent[index])
        if path != self.path or index < self.pos:
            self._open(path)
        try:
            while self.pos < index:
                self.last = next(self.frames)
                self.pos += 1
                self.recent[self.pos] = self.last
                while len(self.recent) > self.keep:
                    self.recent.popitem(last=False)
        except StopIteration:
            raise SkipImage("frame-not-in-video") from None
        except av.error.FFmpegError as e:
            self._open(path)  # a broken packet: the next request starts from a fresh decoder
            raise SkipImage("video-decode-error") from e
        except Exception as e:  # anything else confined to this frame: skip it, reopen on the next request
            self.close()
            raise SkipImage(f"error-{type(e).__name__}", exception_detail(e)) from e
        return self._encode(self.last)

    @staticmethod
    def _encode(frame) -> bytes:
        try:
            return encode_jpeg(frame.to_image())
        except Exception as e:
            raise SkipImage(f"error-{type(e).__name__}", exception_detail(e)) from e

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container = self.path = None
        self.recent.clear()


_DECODER = _ForwardDecoder()


def keep_frames(n: int) -> None:
    """Keep the last ``n`` decoded frames of the open video at hand (a worker sets it once)."""
    _DECODER.keep = max(1, n)


def split_source(source: str) -> tuple[str, str]:
    """-> (file path, frame index as text, or "" for an image file)."""
    path, sep, frame = source.rpartition("#")
    if sep and frame.isdigit() and path.lower().endswith((".avi", ".mp4", ".mkv", ".mov")):
        return path, frame
    return source, ""


def _regular(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the open that follows says why
    if not stat.S_ISREG(mode):
        raise SkipImage("not-a-regular-file", kind_of(mode))


def read_source(source: str) -> bytes:
    """The bytes of an image file, or a video frame encoded as JPEG."""
    path, frame = split_source(source)
    if frame:
        return _DECODER.frame(path, int(frame))
    try:
        with open_regular(path, "image") as f:  # non-blocking open, checked before the first read
            return f.read()
    except InputError:
        _regular(path)
        raise SkipImage("not-a-regular-file") from None  # swapped back to a file between open and stat
