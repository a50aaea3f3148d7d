"""Reading a record's pixels: an image file, or one frame of a video decoded while sharding (DISFA).

A video source is ``<path>#<0-based frame>``. Shards hold consecutive frames of one video, so each worker keeps
one decoder open and decodes forward; asking for an earlier frame reopens the file.
"""

from __future__ import annotations

from pathlib import Path

from ssau.data.images import SkipImage, encode_jpeg, exception_detail


class _ForwardDecoder:
    def __init__(self) -> None:
        self.path: str | None = None
        self.container = None
        self.frames = None
        self.pos = -1
        self.last = None

    def _open(self, path: str) -> None:
        import av  # imported here: only video sources need it

        self.close()
        try:
            self.container = av.open(path)
        except (av.error.FFmpegError, OSError) as e:
            raise SkipImage("video-unreadable") from e
        self.path, self.frames, self.pos, self.last = path, self.container.decode(video=0), -1, None

    def frame(self, path: str, index: int) -> bytes:
        import av

        if path != self.path or index < self.pos:
            self._open(path)
        try:
            while self.pos < index:
                self.last = next(self.frames)
                self.pos += 1
        except StopIteration:
            raise SkipImage("frame-not-in-video") from None
        except av.error.FFmpegError as e:
            self._open(path)  # a broken packet: the next request starts from a fresh decoder
            raise SkipImage("video-decode-error") from e
        except Exception as e:  # anything else confined to this frame: skip it, reopen on the next request
            self.close()
            raise SkipImage(f"error-{type(e).__name__}", exception_detail(e)) from e
        try:
            return encode_jpeg(self.last.to_image())
        except Exception as e:
            raise SkipImage(f"error-{type(e).__name__}", exception_detail(e)) from e

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container = self.path = None


_DECODER = _ForwardDecoder()


def split_source(source: str) -> tuple[str, str]:
    """-> (file path, frame index as text, or "" for an image file)."""
    path, sep, frame = source.rpartition("#")
    if sep and frame.isdigit() and path.lower().endswith((".avi", ".mp4", ".mkv", ".mov")):
        return path, frame
    return source, ""


def read_source(source: str) -> bytes:
    """The bytes of an image file, or a video frame encoded as JPEG."""
    path, frame = split_source(source)
    if frame:
        return _DECODER.frame(path, int(frame))
    return Path(path).read_bytes()
