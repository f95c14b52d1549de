"""Real media through a real mount: ffprobe durations and ffmpeg seeks match the originals.

The clips are generated here with ffmpeg (Debian's), a few MB each so that seeks cross many
chunks: MP4 with the moov atom at the front (faststart) and at the end, MKV, WebM, FLAC, MP3.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import PASSPHRASE, mounted, run_pqfs

pytestmark = [pytest.mark.fuse, pytest.mark.media]

VIDEO = ["-f", "lavfi", "-i", "testsrc2=duration=8:size=640x360:rate=25"]
AUDIO = ["-f", "lavfi", "-i", "sine=frequency=440:beep_factor=4:duration=8"]
H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-g", "25", "-b:v", "3M", "-pix_fmt", "yuv420p"]

VP8 = ["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "2M", "-g", "25"]

CLIPS: dict[str, list[str]] = {
    "front.mp4": [*VIDEO, *AUDIO, *H264, "-c:a", "aac", "-movflags", "+faststart"],
    "end.mp4": [*VIDEO, *AUDIO, *H264, "-c:a", "aac"],
    "clip.mkv": [*VIDEO, *AUDIO, *H264, "-c:a", "libvorbis"],
    "clip.webm": [*VIDEO, *AUDIO, *VP8, "-c:a", "libopus"],
    "tone.flac": [*AUDIO, "-c:a", "flac"],
    "tone.mp3": [*AUDIO, "-c:a", "libmp3lame", "-b:a", "192k"],
}
VIDEO_CLIPS = ["front.mp4", "end.mp4", "clip.mkv", "clip.webm"]
AUDIO_CLIPS = ["tone.flac", "tone.mp3"]
SEEKS = ["0", "1.5", "3.72", "6.2", "7.5"]


def ffprobe_duration(path: Path) -> str:
    return subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def ffmpeg_md5(path: Path, seek: str, *select: str) -> str:
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-ss", seek, "-i", str(path), *select, "-f", "md5", "-"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert out.startswith("MD5=")
    return out


def atom_offset(path: Path, atom: bytes) -> int:
    """Offset of a top-level MP4 atom."""
    data = path.read_bytes()
    off = 0
    while off + 8 <= len(data):
        size = int.from_bytes(data[off : off + 4], "big")
        if data[off + 4 : off + 8] == atom:
            return off
        off += size if size >= 8 else len(data)
    raise AssertionError(f"no {atom!r} atom in {path}")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("media")
    src = base / "media"
    src.mkdir()
    for name, args in CLIPS.items():
        subprocess.run(
            ["ffmpeg", "-v", "error", "-nostdin", "-y", *args, str(src / name)], check=True
        )
    env = dict(os.environ, PQFS_PASSPHRASE=PASSPHRASE.decode(), PQFS_SCRYPT_LOG_N="10")
    vault = base / "vault"
    run_pqfs("init", str(vault), env=env)
    run_pqfs("add", str(vault), str(src), env=env)
    with mounted(vault, base / "mnt", env) as mp:
        yield src, mp / "media"


def test_fixture_media_is_what_it_claims(media: tuple[Path, Path]) -> None:
    src, _ = media
    assert atom_offset(src / "front.mp4", b"moov") < atom_offset(src / "front.mp4", b"mdat")
    assert atom_offset(src / "end.mp4", b"moov") > atom_offset(src / "end.mp4", b"mdat")
    assert all((src / n).stat().st_size > 4 * 65536 for n in VIDEO_CLIPS)  # seeks cross chunks


@pytest.mark.parametrize("name", list(CLIPS))
def test_ffprobe_duration_matches(media: tuple[Path, Path], name: str) -> None:
    src, mnt = media
    expected = ffprobe_duration(src / name)
    assert abs(float(expected) - 8.0) < 0.2
    assert ffprobe_duration(mnt / name) == expected


@pytest.mark.parametrize("name", VIDEO_CLIPS)
def test_video_seeks_decode_the_same_frame(media: tuple[Path, Path], name: str) -> None:
    src, mnt = media
    frames = {ffmpeg_md5(src / name, t, "-map", "0:v", "-frames:v", "1") for t in SEEKS}
    assert len(frames) == len(SEEKS)  # the clip really changes over time: the test can fail
    for t in SEEKS:
        want = ffmpeg_md5(src / name, t, "-map", "0:v", "-frames:v", "1")
        assert ffmpeg_md5(mnt / name, t, "-map", "0:v", "-frames:v", "1") == want, (name, t)


@pytest.mark.parametrize("name", [*AUDIO_CLIPS, "end.mp4", "clip.webm"])
def test_audio_seeks_decode_the_same_samples(media: tuple[Path, Path], name: str) -> None:
    src, mnt = media
    for t in SEEKS:
        want = ffmpeg_md5(src / name, t, "-map", "0:a", "-t", "0.5")
        assert ffmpeg_md5(mnt / name, t, "-map", "0:a", "-t", "0.5") == want, (name, t)


def test_full_decode_matches(media: tuple[Path, Path]) -> None:
    src, mnt = media
    for name in ["end.mp4", "tone.flac"]:
        assert ffmpeg_md5(mnt / name, "0") == ffmpeg_md5(src / name, "0")
